# The NVIDIA GPU device plugin, as the Nomad agent loads it from plugin_dir
# (`pyhpc install-plugin --gpu --plugin-dir DIR` installs it as "pyhpc-gpu").
# Jobs ask for GPUs with `resources { device "nvidia/gpu" { count = 1 } }`; the pyhpc driver
# then gives the container only those GPUs' device nodes and the host driver's libraries.
plugin "pyhpc-gpu" {
  config {
    enabled            = true
    ignored_gpu_ids    = []
    fingerprint_period = "1m"
  }
}
