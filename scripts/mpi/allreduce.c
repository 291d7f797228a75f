/* Sum of 1..size over all ranks with MPI_Allreduce, checked on every rank; exits 1 on a wrong
 * sum. With an argument N, repeats N times over a 1 MiB vector (a longer, heavier run). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  int rank, size, len;
  char host[MPI_MAX_PROCESSOR_NAME];
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Get_processor_name(host, &len);
  int rounds = argc > 1 ? atoi(argv[1]) : 1, n = 1 << 18;
  double *in = malloc(n * sizeof *in), *out = malloc(n * sizeof *out);
  for (int i = 0; i < n; i++) in[i] = rank + 1;
  int bad = 0;
  for (int r = 0; r < rounds; r++) {
    MPI_Allreduce(in, out, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < n; i++) bad += out[i] != size * (size + 1) / 2.0;
  }
  printf("allreduce rank %d of %d on %s: sum %.0f (expected %d), %s\n", rank, size, host, out[0],
         size * (size + 1) / 2, bad ? "WRONG" : "ok");
  MPI_Finalize();
  return bad ? 1 : 0;
}
