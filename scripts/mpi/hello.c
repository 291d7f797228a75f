/* Every rank says who and where it is. With `--fail-rank N`, rank N then exits 3 without
 * MPI_Finalize, as a crashed rank would, while the others compute for a second and then wait
 * in a barrier: a launcher must end the run and name that rank, the first to fail (the others
 * fail only after it, when they find it gone). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
  int rank, size, len, fail = -1;
  char host[MPI_MAX_PROCESSOR_NAME];
  MPI_Init(&argc, &argv);
  if (argc == 3 && strcmp(argv[1], "--fail-rank") == 0) fail = atoi(argv[2]);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Get_processor_name(host, &len);
  printf("hello from rank %d of %d on %s (pid %d)\n", rank, size, host, (int)getpid());
  fflush(stdout);
  if (rank == fail) _exit(3);
  if (fail >= 0) {
    sleep(1);                    /* "computing" */
    MPI_Barrier(MPI_COMM_WORLD); /* never completes: one rank is gone */
  }
  MPI_Finalize();
  return 0;
}
