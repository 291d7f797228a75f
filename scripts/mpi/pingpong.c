/* Ping-pong between rank 0 and rank 1: latency (8 bytes, half round trip, microseconds) and
 * bandwidth (4 MiB messages, MB/s). Each is timed over as many round trips as fill about half a
 * second (latency) and a second (bandwidth), sized from a first timed batch, so a slow path
 * does not take minutes and a fast one is not over before the noise averages out. Prints one
 * line: "pingpong latency_us=... bandwidth_MBps=... (N and M round trips)" */
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

/* How many round trips fill about `seconds`, from a first timed batch of `first` (also the
 * warm-up); rank 0 decides, so both ranks run the same number. */
static int iterations(char *buf, int bytes, int first, int most, double seconds, int rank) {
  double one_way = run(buf, bytes, first, rank);
  int n = (int)(seconds / (2 * one_way));
  n = n < first ? first : n > most ? most : n;
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  return n;
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
  int small_n = iterations(buf, 8, 100, 100000, 0.5, rank);
  double lat = run(buf, 8, small_n, rank);
  int big_n = iterations(buf, big, 5, 1000, 1.0, rank);
  double bw = run(buf, big, big_n, rank);
  if (rank == 0)
    printf("pingpong latency_us=%.2f bandwidth_MBps=%.0f (%d and %d round trips)\n", lat * 1e6,
           big / bw / 1e6, small_n, big_n);
  MPI_Finalize();
  return 0;
}
