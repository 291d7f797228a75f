# The NVIDIA GPU device plugin, as the Nomad agent loads it from plugin_dir
# (`pyhpc install-plugin --gpu --plugin-dir DIR` installs it as "pyhpc-gpu").
# Jobs ask for GPUs with `resources { device "nvidia/gpu" { count = 1 } }`; the pyhpc driver
# then gives the container only those GPUs' device nodes and the host driver's libraries.
# A GPU in MIG mode is offered as its MIG devices, one group per profile
# ("NVIDIA A100-SXM4-80GB MIG 1g.10gb"), never whole; ignoring a GPU's UUID ignores its slices.
plugin "pyhpc-gpu" {
  config {
    enabled            = true
    ignored_gpu_ids    = []
    fingerprint_period = "1m"
    # CDI specs (nvidia-ctk cdi generate) describing the reserved devices are used instead of
    # pyhpc's own discovery: root-owned files only, JSON (YAML where PyYAML is installed),
    # hooks never run. [] turns CDI off.
    cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]
  }
}
