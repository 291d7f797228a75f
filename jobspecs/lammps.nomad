# LAMMPS, the molecular dynamics code, as a multi-node MPI job: Debian's build (Open MPI) in
# the MPI image, running the Lennard-Jones melt benchmark across `workers` nodes. The pattern is
# jobspecs/mpi-multi.nomad's (a launcher plus workers, no sshd), which also shows Consul for the
# rendezvous and the certificate the launcher needs on a cluster with mutual TLS.
#   scripts/make-mpi-image.sh
#   nomad job run jobspecs/lammps.nomad
#   nomad job run -var workers=4 -var ranks_per_node=8 -var scale=4 jobspecs/lammps.nomad
#   nomad alloc logs -job lammps launcher      # ends with "Performance: ... timesteps/s"
# Your own input: put it in the image (or a dataset), and set -var input=/path/to/in.file.

variable "image" {
  type    = string
  default = "/var/lib/pyhpc/images/mpi.sqsh"
}

variable "input" {
  type        = string
  default     = "/opt/lammps/in.lj"
  description = "the LAMMPS input script, as seen inside the container"
}

variable "scale" {
  type        = number
  default     = 1
  description = "problem size: 32,000 atoms times scale cubed (in.lj's own variable)"
}

variable "steps" {
  type    = number
  default = 200
}

variable "workers" {
  type    = number
  default = 2
}

variable "ranks_per_node" {
  type    = number
  default = 1
}

variable "worker_cpu" {
  type        = number
  default     = 2000
  description = "MHz per worker: a core's worth for each rank, which busy-polls while it waits"
}

variable "node_pool" {
  type    = string
  default = "mpi"
}

job "lammps" {
  datacenters = ["*"]
  node_pool   = var.node_pool
  type        = "batch"

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
          implementation = "openmpi"
          ranks_per_node = var.ranks_per_node
          mode           = "worker"
        }
      }

      # LAMMPS is built with OpenMP too: one thread per rank.
      env {
        OMP_NUM_THREADS = "1"
      }

      service {
        provider = "nomad"
        name     = "${NOMAD_JOB_ID}-workers"
        address  = "${attr.unique.network.ip-address}"
        tags     = ["${NOMAD_ALLOC_ID}"]
      }

      template {
        destination = "local/mpi-hosts"
        change_mode = "noop"
        data        = <<-EOT
          {{- range nomadService (printf "%s-launcher" (env "NOMAD_JOB_ID")) }}
          {{ .Address }} {{ index .Tags 0 }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = var.worker_cpu
        memory = 1024
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
        command  = "/usr/bin/lmp"
        args     = ["-in", var.input, "-var", "scale", "${var.scale}", "-var", "steps", "${var.steps}", "-log", "none"]
        hostname = "${node.unique.name}"

        mpi {
          implementation = "openmpi"
          ranks_per_node = var.ranks_per_node
          mode           = "launcher"
          workers        = var.workers
          # Let the kernel place the ranks: Open MPI would pin each to the first cores, which
          # the node may have given to other tasks.
          launcher_args = ["--bind-to", "none"]
        }
      }

      service {
        provider = "nomad"
        name     = "${NOMAD_JOB_ID}-launcher"
        address  = "${attr.unique.network.ip-address}"
        tags     = ["${NOMAD_ALLOC_ID}"]
      }

      # The remote shell's token (nomad alloc exec into the workers) on a cluster with ACLs;
      # see jobspecs/mpi-multi.nomad and the admin guide for the policy it needs.
      identity {
        env = true
      }

      template {
        destination = "local/mpi-hosts"
        change_mode = "noop"
        data        = <<-EOT
          {{- range nomadService (printf "%s-workers" (env "NOMAD_JOB_ID")) }}
          {{ .Address }} {{ index .Tags 0 }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = 200
        memory = 512
      }
    }
  }
}
