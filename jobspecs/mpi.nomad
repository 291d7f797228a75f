# MPI ranks in one pyhpc container: the driver runs the command under the image's MPI launcher
# (`mpirun -n 2 ...` for Open MPI, `mpiexec.hydra -n 2 ...` for MPICH). The ranks share the
# container's namespaces, so shared memory and the single-copy transport (CMA) work between
# them. `cores` reserves a core per rank: the ranks are pinned to cores no other task uses.
#   scripts/make-mpi-image.sh            # Debian + Open MPI + MPICH + the test programs
#   nomad job run jobspecs/mpi.nomad
# Across nodes: jobspecs/mpi-multi.nomad (a launcher and workers).
job "mpi" {
  datacenters = ["*"]
  type        = "batch"

  group "mpi" {
    restart {
      attempts = 0
      mode     = "fail"
    }

    task "allreduce" {
      driver = "pyhpc"

      config {
        image   = "/var/lib/pyhpc/images/mpi.sqsh"
        command = "/opt/mpi/openmpi/allreduce"
        args    = ["20"]

        mpi {
          implementation = "openmpi"
          ranks_per_node = 2
        }
      }

      resources {
        cores  = 2
        memory = 512
      }
    }
  }
}
