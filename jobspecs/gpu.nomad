# One GPU for a batch task. Nomad places it only on a node whose pyhpc-gpu device plugin
# reports a free NVIDIA GPU; the task sees that GPU's device node alone, with the host
# driver's tools in /usr/local/nvidia/bin and its libraries in /usr/local/nvidia/lib64.
#   nomad job run jobspecs/gpu.nomad
#   nomad job run -var image=/var/lib/pyhpc/images/pytorch.sqsh -var command=python3 \
#     -var 'args=["-c", "import torch; print(torch.cuda.get_device_name())"]' jobspecs/gpu.nomad
# The image needs a C library: nvidia-smi and every CUDA program link against one (a CUDA
# base image imported with `pyhpc image import`, or what scripts/gpu-check.sh builds).
# Ask for a model with a constraint on the device, e.g.
#   constraint { attribute = "${device.model}"  value = "NVIDIA H100 80GB HBM3" }
# or for memory: constraint { attribute = "${device.attr.memory}"  operator = ">="  value = "40 GiB" }

variable "image" {
  type    = string
  default = "/var/lib/pyhpc/images/cuda.sqsh"
}

variable "command" {
  type    = string
  default = "/usr/local/nvidia/bin/nvidia-smi"
}

variable "args" {
  type    = list(string)
  default = ["-L"]
}

job "gpu" {
  datacenters = ["*"]
  type        = "batch"

  group "gpu" {
    task "gpu" {
      driver = "pyhpc"

      config {
        image   = var.image
        command = var.command
        args    = var.args
      }

      resources {
        cpu    = 100
        memory = 256

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
