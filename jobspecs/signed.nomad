# An image that must carry a valid signature. On the plugin side:
#   signature_rules = ["docker://registry.example.org:5000/prod/=enforce"]
#   signature_keys  = ["pyhpc-images"]     # Vault transit key(s) trusted to sign
# and the image signed after review:  pyhpc image sign docker://.../prod/solver:1.4 --key pyhpc-images
# An unsigned or altered image is refused before it starts; the task's events say who signed.
#   nomad job run -var image=docker://127.0.0.1:5000/signed/solver:1 jobspecs/signed.nomad
variable "image" {
  type        = string
  description = "an image reference under an enforced signature rule"
  default     = "docker://127.0.0.1:5000/signed/solver:1"
}

job "signed" {
  datacenters = ["*"]
  type        = "batch"

  group "signed" {
    task "run" {
      driver = "pyhpc"

      config {
        image = var.image
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
