# A long-running web service on pyhpc, registered in Consul with an HTTP and a TCP check.
#   nomad job run jobspecs/service.nomad
#   curl -s http://127.0.0.1:8500/v1/health/service/pyhpc-web?passing=1 | jq '.[].Service'
# pyhpc tasks use the node's network: Consul gets the node's address and the port Nomad
# allocated to the group ("http" below, handed to the task as NOMAD_PORT_http).
job "web" {
  datacenters = ["*"]
  type        = "service"

  group "web" {
    count = 1

    network {
      port "http" {}
    }

    task "httpd" {
      driver = "pyhpc"

      config {
        image    = "/var/lib/pyhpc/images/busybox.sqsh"
        command  = "/bin/sh"
        args     = ["-c", "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p $NOMAD_PORT_http -h /tmp/www"]
        writable = "tmpfs"
      }

      service {
        name     = "pyhpc-web"
        provider = "consul"
        port     = "http"
        tags     = ["pyhpc", "example"]

        check {
          name     = "http"
          type     = "http"
          path     = "/index.html"
          interval = "2s"
          timeout  = "1s"
        }

        check {
          name     = "tcp"
          type     = "tcp"
          interval = "2s"
          timeout  = "1s"
        }
      }

      resources {
        cpu    = 100
        memory = 32
      }
    }
  }
}
