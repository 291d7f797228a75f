/* Ping-pong between rank 0 and rank 1: latency (8 bytes, half round trip, microseconds) and
 * bandwidth (4 MiB messages, MB/s). Prints one line: "pingpong latency_us=... bandwidth_MBps=..." */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static double run(char *buf, int bytes, int iters, int rank) {
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = MPI_Wtime();
  for (int i = 0; i < iters; i++) {
    if (rank == 0) {
      MPI_Send(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD);
      MPI_Recv(buf, bytes, MPI_CHAR, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
      MPI_Recv(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      MPI_Send(buf, bytes, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
    }
  }
  return (MPI_Wtime() - t0) / iters / 2; /* one way */
}

int main(int argc, char **argv) {
  int rank, size;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) {
    if (rank == 0) fprintf(stderr, "pingpong: needs 2 ranks\n");
    MPI_Finalize();
    return 2;
  }
  int big = 4 << 20;
  char *buf = calloc(1, big);
  run(buf, 8, 100, rank); /* warm-up */
  double lat = run(buf, 8, 10000, rank);
  run(buf, big, 10, rank);
  double bw = run(buf, big, 200, rank); /* 1.6 GB, about a second here: less noise */
  if (rank == 0) printf("pingpong latency_us=%.2f bandwidth_MBps=%.0f\n", lat * 1e6, big / bw / 1e6);
  MPI_Finalize();
  return 0;
}
