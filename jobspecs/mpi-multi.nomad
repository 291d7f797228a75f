# MPI across Nomad allocations, in the style of a launcher plus workers (as Kubernetes' MPI
# Operator does it), with pyhpc containers and no sshd:
#  - group "worker": `workers` allocations on distinct nodes, each registering a service (in
#    Nomad's own catalog, or Consul's with -var service_provider=consul) and holding
#    `ranks_per_node` ranks;
#  - group "launcher": waits until every worker is registered (a start barrier in place of gang
#    scheduling), writes the hostfile and runs mpirun / mpiexec.hydra, whose remote shell is
#    pyhpc-rsh: it starts the MPI daemons in each worker's container through Nomad's exec API.
# A lost worker or a failing rank ends the launcher with the cause named; the workers end when
# the launcher does. `nomad job stop` ends every rank.
#   scripts/make-mpi-image.sh
#   nomad job run jobspecs/mpi-multi.nomad
#   nomad job run -var implementation=mpich -var program=/opt/mpi/mpich/allreduce \
#     -var workers=4 jobspecs/mpi-multi.nomad
# The nodes should be a pool of their own (node_pool below), so the start barrier is not
# kept waiting by other work.

variable "implementation" {
  type        = string
  default     = "openmpi"
  description = "openmpi or mpich: the MPI the program was built against"
}

variable "program" {
  type    = string
  default = "/opt/mpi/openmpi/hello"
}

variable "args" {
  type    = list(string)
  default = []
}

variable "launcher_args" {
  type        = list(string)
  default     = []
  description = "extra arguments for mpirun / mpiexec.hydra, e.g. [\"--bind-to\", \"none\"]"
}

variable "workers" {
  type    = number
  default = 2
}

variable "ranks_per_node" {
  type    = number
  default = 2
}

variable "worker_cpu" {
  type        = number
  default     = 500
  description = "MHz per worker; the ranks share it (they busy-poll: give each rank a core's worth)"
}

variable "image" {
  type    = string
  default = "/var/lib/pyhpc/images/mpi.sqsh"
}

variable "service_provider" {
  type        = string
  default     = "nomad"
  description = "where the workers and the launcher find each other: nomad (always there) or consul"
  validation {
    condition     = contains(["nomad", "consul"], var.service_provider)
    error_message = "The service_provider must be \"nomad\" or \"consul\"."
  }
}

locals {
  # The template function that reads that catalog.
  catalog = var.service_provider == "consul" ? "service" : "nomadService"
}

variable "nomad_tls" {
  type        = string
  default     = ""
  description = "On a cluster whose agents verify HTTPS clients (tls.verify_https_client): the Nomad Variable (keys ca, cert, key: PEM) holding the client certificate the launcher's remote shell presents, e.g. nomad/jobs/mpi-multi, which this job's workload identity may read. Empty: none."
}

variable "node_pool" {
  type    = string
  default = "mpi"
}

job "mpi-multi" {
  datacenters = ["*"]
  node_pool   = var.node_pool
  type        = "batch"

  # An MPI run is not restarted piecewise: a failure fails the job.
  reschedule {
    attempts  = 0
    unlimited = false
  }

  group "worker" {
    count = var.workers

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    restart {
      attempts = 0
      mode     = "fail"
    }

    task "worker" {
      driver = "pyhpc"

      config {
        image    = var.image
        hostname = "${node.unique.name}"

        mpi {
          implementation = var.implementation
          ranks_per_node = var.ranks_per_node
          mode           = "worker"
        }
      }

      service {
        provider = var.service_provider
        name     = "${NOMAD_JOB_ID}-workers"
        address  = "${attr.unique.network.ip-address}"
        tags     = ["${NOMAD_ALLOC_ID}"]
      }

      # The launcher's address; the worker ends once it has come and gone.
      template {
        destination = "local/mpi-hosts"
        change_mode = "noop"
        data        = <<-EOT
          {{- range ${local.catalog} (printf "%s-launcher" (env "NOMAD_JOB_ID")) }}
          {{ .Address }} {{ index .Tags 0 }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = var.worker_cpu
        memory = 512
      }
    }
  }

  group "launcher" {
    restart {
      attempts = 0
      mode     = "fail"
    }

    task "launcher" {
      driver = "pyhpc"

      config {
        image    = var.image
        command  = var.program
        args     = var.args
        hostname = "${node.unique.name}"

        mpi {
          implementation = var.implementation
          ranks_per_node = var.ranks_per_node
          mode           = "launcher"
          workers        = var.workers
          launcher_args  = var.launcher_args
        }
      }

      service {
        provider = var.service_provider
        name     = "${NOMAD_JOB_ID}-launcher"
        address  = "${attr.unique.network.ip-address}"
        tags     = ["${NOMAD_ALLOC_ID}"]
      }

      # The job's own credentials for the remote shell (nomad alloc exec) on a cluster with
      # ACLs: the workload identity's token, as NOMAD_TOKEN. Give it rights with a policy
      # linked to this task (see the README: alloc-exec, read-job, alloc-lifecycle).
      identity {
        env = true
      }

      # MPICH's launcher gives its proxies this address to call back to. With mutual TLS, the
      # remote shell's Nomad CLI presents the certificate the templates below put in secrets/
      # (the plugin's mpi_nomad_address is then https://).
      env {
        PYHPC_MPI_ADDRESS = "${attr.unique.network.ip-address}"
        NOMAD_CACERT      = var.nomad_tls == "" ? "" : "${NOMAD_SECRETS_DIR}/nomad-ca.pem"
        NOMAD_CLIENT_CERT = var.nomad_tls == "" ? "" : "${NOMAD_SECRETS_DIR}/nomad-cert.pem"
        NOMAD_CLIENT_KEY  = var.nomad_tls == "" ? "" : "${NOMAD_SECRETS_DIR}/nomad-key.pem"
      }

      dynamic "template" {
        for_each = var.nomad_tls == "" ? [] : ["ca", "cert", "key"]
        content {
          destination = "secrets/nomad-${template.value}.pem"
          change_mode = "noop"
          data        = "{{ with nomadVar \"${var.nomad_tls}\" }}{{ .${template.value} }}{{ end }}"
        }
      }

      # One "ADDRESS ALLOC_ID" line per registered worker: the start barrier counts them.
      template {
        destination = "local/mpi-hosts"
        change_mode = "noop"
        data        = <<-EOT
          {{- range ${local.catalog} (printf "%s-workers" (env "NOMAD_JOB_ID")) }}
          {{ .Address }} {{ index .Tags 0 }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
