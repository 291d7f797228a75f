# The pyhpc task driver, as the Nomad agent loads it from plugin_dir.
# The block label must equal the file name in plugin_dir ("pyhpc", see `pyhpc install-plugin`).
# Every option is listed by `pyhpc config-reference`.
plugin "pyhpc" {
  config {
    # Per-task supervisor sockets and exit status live here; keep it on a local disk or tmpfs.
    run_dir = "/run/pyhpc"

    # How often the driver re-checks the node (loop devices, squashfs, overlay, nsenter).
    fingerprint_period = "30s"
  }
}
