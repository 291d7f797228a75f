# The flagship: a parameterized HPC batch job on pyhpc. Register it once, then dispatch work:
#   nomad job run jobspecs/hpc.nomad
#   nomad job dispatch -meta size=1000000 -meta label=run1 hpc input.txt
#   nomad job status hpc                      # the dispatched children
# While a run works it is in Consul as "hpc-solver" (TCP check on its status port), so
# dashboards and other jobs can find it. In production point `image` at your registry,
# e.g. "docker://registry.example.org:5000/hpc/solver:1.4" (allowed by image_sources).
job "hpc" {
  datacenters = ["*"]
  type        = "batch"

  parameterized {
    payload       = "optional"
    meta_required = ["size"]
    meta_optional = ["label", "hold"]
  }

  group "solve" {
    restart {
      attempts = 1
      mode     = "fail"
    }

    network {
      port "status" {}
    }

    task "solver" {
      driver = "pyhpc"

      config {
        image    = "/var/lib/pyhpc/images/busybox.sqsh"
        command  = "/bin/sh"
        args     = ["/local/solve.sh"]
        writable = "tmpfs"
      }

      # The dispatch payload (optional) lands in /local/input.txt.
      dispatch_payload {
        file = "input.txt"
      }

      template {
        destination = "local/solve.sh"
        data        = <<-EOT
          set -eu
          case "$${NOMAD_META_size}" in
            ""|*[!0-9]*) echo "size must be a whole number, not '$${NOMAD_META_size}'" >&2; exit 2 ;;
          esac
          mkdir -p /tmp/www
          echo "running $${NOMAD_META_label:-unlabelled}" > /tmp/www/index.html
          httpd -p $${NOMAD_PORT_status} -h /tmp/www
          lines=0
          [ -f /local/input.txt ] && lines=$(wc -l < /local/input.txt)
          sum=$(seq 1 $${NOMAD_META_size} | awk '{ s += $1 } END { printf "%.0f", s }')
          echo "label=$${NOMAD_META_label:-unlabelled} size=$${NOMAD_META_size} sum=$sum input_lines=$lines"
          sleep $${NOMAD_META_hold:-5}
        EOT
      }

      service {
        name     = "hpc-solver"
        provider = "consul"
        port     = "status"
        tags     = ["pyhpc"]

        check {
          type     = "http"
          path     = "/"
          interval = "2s"
          timeout  = "1s"
        }

        # Runs inside the container, through the driver's exec.
        check {
          name     = "solver-alive"
          type     = "script"
          command  = "/bin/sh"
          args     = ["-c", "test -s /tmp/www/index.html"]
          interval = "2s"
          timeout  = "2s"
        }
      }

      resources {
        cpu    = 200
        memory = 64
      }
    }
  }
}
