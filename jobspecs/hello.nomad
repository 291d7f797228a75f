# The smallest pyhpc job: run a command from a SquashFS image and print to the alloc logs.
#   scripts/make-demo-image.sh          # builds /var/lib/pyhpc/images/busybox.sqsh
#   nomad job run jobspecs/hello.nomad
#   nomad alloc logs -job hello
job "hello" {
  datacenters = ["*"]
  type        = "batch"

  group "hello" {
    task "hello" {
      driver = "pyhpc"

      config {
        image   = "/var/lib/pyhpc/images/busybox.sqsh"
        command = "/bin/sh"
        args    = ["-c", "echo \"hello from $(hostname), a pyhpc container on ${node.unique.name}\"; cat /proc/1/comm >/dev/null; ls /local /alloc >/dev/null && echo 'alloc dirs mounted'"]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
