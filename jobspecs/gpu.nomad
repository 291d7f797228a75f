# One GPU for a batch task. Nomad places it only on a node whose pyhpc-gpu device plugin
# reports a free NVIDIA GPU; the task sees that GPU's device node alone, with the host
# driver's tools in /usr/local/nvidia/bin and its libraries in /usr/local/nvidia/lib64.
#   nomad job run jobspecs/gpu.nomad
# Ask for a model with a constraint on the device, e.g.
#   constraint { attribute = "${device.model}"  value = "NVIDIA H100 80GB HBM3" }
# or for memory: constraint { attribute = "${device.attr.memory}"  operator = ">="  value = "40 GiB" }
job "gpu" {
  datacenters = ["*"]
  type        = "batch"

  group "gpu" {
    task "smi" {
      driver = "pyhpc"

      config {
        image   = "/var/lib/pyhpc/images/busybox.sqsh"
        command = "/usr/local/nvidia/bin/nvidia-smi"
        args    = ["-L"]
      }

      resources {
        cpu    = 100
        memory = 64

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
