/* cudacheck: allocate GPU memory, run a kernel, check its result, through the CUDA driver API.
 * Built by scripts/gpu-check.sh and run inside a pyhpc container, where libcuda.so.1 comes
 * from the host driver (mounted read-only by the pyhpc-gpu reservation). No CUDA toolkit is
 * needed to build it: libcuda is opened at run time and the kernel is PTX, compiled by the
 * driver's JIT for whatever GPU it finds. Exit 0 only if every element is right. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream;
typedef unsigned long long CUdeviceptr;

typedef CUresult (*cuGetErrorString_t)(CUresult, const char **);
typedef CUresult (*cuInit_t)(unsigned);
typedef CUresult (*cuDeviceGetCount_t)(int *);
typedef CUresult (*cuDeviceGet_t)(CUdevice *, int);
typedef CUresult (*cuDeviceGetName_t)(char *, int, CUdevice);
typedef CUresult (*cuCtxCreate_v2_t)(CUcontext *, unsigned, CUdevice);
typedef CUresult (*cuMemAlloc_v2_t)(CUdeviceptr *, size_t);
typedef CUresult (*cuModuleLoadData_t)(CUmodule *, const void *);
typedef CUresult (*cuModuleGetFunction_t)(CUfunction *, CUmodule, const char *);
typedef CUresult (*cuLaunchKernel_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                   unsigned, unsigned, CUstream, void **, void **);
typedef CUresult (*cuCtxSynchronize_t)(void);
typedef CUresult (*cuMemcpyDtoH_v2_t)(void *, CUdeviceptr, size_t);
typedef CUresult (*cuMemFree_v2_t)(CUdeviceptr);
typedef CUresult (*cuCtxDestroy_v2_t)(CUcontext);

/* out[i] = 2 * i for i < n */
static const char PTX[] =
    ".version 7.0\n"
    ".target sm_50\n"
    ".address_size 64\n"
    ".visible .entry fill(.param .u64 out, .param .u32 n)\n"
    "{\n"
    "  .reg .pred %p;\n"
    "  .reg .b32 %r<7>;\n"
    "  .reg .b64 %rd<5>;\n"
    "  ld.param.u64 %rd1, [out];\n"
    "  ld.param.u32 %r1, [n];\n"
    "  mov.u32 %r2, %ctaid.x;\n"
    "  mov.u32 %r3, %ntid.x;\n"
    "  mov.u32 %r4, %tid.x;\n"
    "  mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "  setp.ge.u32 %p, %r5, %r1;\n"
    "  @%p bra DONE;\n"
    "  cvta.to.global.u64 %rd2, %rd1;\n"
    "  mul.wide.u32 %rd3, %r5, 4;\n"
    "  add.s64 %rd4, %rd2, %rd3;\n"
    "  shl.b32 %r6, %r5, 1;\n"
    "  st.global.u32 [%rd4], %r6;\n"
    "DONE:\n"
    "  ret;\n"
    "}\n";

#define SYM(name) name##_t name = (name##_t)dlsym(lib, #name)
#define CHECK(call)                                                              \
  do {                                                                           \
    CUresult rc_ = (call);                                                       \
    if (rc_ != 0) {                                                              \
      const char *msg_ = "?";                                                    \
      if (cuGetErrorString) cuGetErrorString(rc_, &msg_);                        \
      fprintf(stderr, "cudacheck: %s failed: %d %s\n", #call, rc_, msg_);        \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

int main(int argc, char **argv) {
  unsigned n = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 16u << 20; /* 64 MiB */
  void *lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) {
    fprintf(stderr, "cudacheck: cannot load libcuda.so.1: %s\n", dlerror());
    return 2;
  }
  SYM(cuGetErrorString);
  SYM(cuInit);
  SYM(cuDeviceGetCount);
  SYM(cuDeviceGet);
  SYM(cuDeviceGetName);
  SYM(cuCtxCreate_v2);
  SYM(cuMemAlloc_v2);
  SYM(cuModuleLoadData);
  SYM(cuModuleGetFunction);
  SYM(cuLaunchKernel);
  SYM(cuCtxSynchronize);
  SYM(cuMemcpyDtoH_v2);
  SYM(cuMemFree_v2);
  SYM(cuCtxDestroy_v2);
  if (!cuInit || !cuCtxCreate_v2 || !cuLaunchKernel || !cuMemcpyDtoH_v2) {
    fprintf(stderr, "cudacheck: libcuda.so.1 lacks the driver API calls needed\n");
    return 2;
  }
  int count = 0;
  char name[128] = "";
  CUdevice dev;
  CUcontext ctx;
  CUmodule mod;
  CUfunction fn;
  CUdeviceptr buf;
  CHECK(cuInit(0));
  CHECK(cuDeviceGetCount(&count));
  CHECK(cuDeviceGet(&dev, 0));
  CHECK(cuDeviceGetName(name, sizeof name, dev));
  CHECK(cuCtxCreate_v2(&ctx, 0, dev));
  CHECK(cuMemAlloc_v2(&buf, (size_t)n * 4));
  CHECK(cuModuleLoadData(&mod, PTX));
  CHECK(cuModuleGetFunction(&fn, mod, "fill"));
  void *params[] = {&buf, &n};
  unsigned threads = 256, blocks = (n + threads - 1) / threads;
  CHECK(cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, NULL, params, NULL));
  CHECK(cuCtxSynchronize());
  unsigned *host = malloc((size_t)n * 4);
  if (!host) return 1;
  CHECK(cuMemcpyDtoH_v2(host, buf, (size_t)n * 4));
  unsigned bad = 0;
  for (unsigned i = 0; i < n; i++) bad += host[i] != 2 * i;
  CHECK(cuMemFree_v2(buf));
  CHECK(cuCtxDestroy_v2(ctx));
  printf("cudacheck: %d device(s) visible; on %s: %u MiB allocated, kernel over %u elements, "
         "%u wrong\n", count, name, (unsigned)((size_t)n * 4 >> 20), n, bad);
  return bad ? 1 : 0;
}
