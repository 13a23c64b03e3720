// The floor under a 4 KiB request at queue depth 1 on the GPU: what one small copy between
// pinned host memory and GPU memory costs, as the CPU thread that submits it sees it (submit
// to completion observed, median and tail of N copies), by every route we could think of:
//
//   - cuMemcpyAsync + an event, spun on with cuEventQuery (what the engine does for a lone
//     copy), or with cuStreamSynchronize under spin scheduling;
//   - the same copy done by a one-block kernel reading mapped host memory (the gather kernel
//     with one descriptor);
//   - the things the engine does differently: several streams in turn, many host buffers,
//     random offsets over 4 GiB, 2 MiB VMM chunks each at its own reservation;
//   - a second thread watching the event (the engine's completion thread), and both threads
//     querying it at once;
//   - a persistent kernel polling a mailbox in mapped host memory (no launch, no event), with
//     and without __nanosleep between polls, and a check that what it wrote is right.
//
// No vramdisk code is involved: these are the numbers the engine's own QD1 figures (`vramdisk
// bench --only 4K`) are to be read against. Build and run on the GPU machine (it has nvcc):
//
//   nvcc -O2 -arch=sm_90 -o /tmp/cuda-qd1-floor bench/cuda-qd1-floor.cu -lcuda
//   /tmp/cuda-qd1-floor 20000        # copies per row
//
// Results: bench/results/engine-gpu.md (2026-12-04).
#include <cuda_runtime.h>
#include <cuda.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <chrono>
#include <atomic>
#include <x86intrin.h>
#include <thread>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)
static double now_us() { return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Mailbox {
  unsigned long long seq;   // CPU -> GPU: request number (~0 = quit)
  unsigned long long dir;   // 0: host->device, 1: device->host
  unsigned long long off;   // offset in GPU buffer, in bytes
  unsigned long long len;   // bytes
  unsigned long long pad[4];
  unsigned long long done;  // GPU -> CPU: last finished request
};

__global__ void copy1(const uint4* s, uint4* d, int n) { for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i]; }

__global__ void persist(Mailbox* mb, char* dev, char* host, int sleep_ns) {
  __shared__ unsigned long long s_seq, s_dir, s_off, s_len;
  unsigned long long last = 0;
  for (;;) {
    if (threadIdx.x == 0) {
      unsigned long long s;
      while ((s = *(volatile unsigned long long*)&mb->seq) == last) { if (sleep_ns) __nanosleep(sleep_ns); }
      __threadfence_system();
      s_seq = s; s_dir = *(volatile unsigned long long*)&mb->dir; s_off = *(volatile unsigned long long*)&mb->off; s_len = *(volatile unsigned long long*)&mb->len;
    }
    __syncthreads();
    unsigned long long s = s_seq;
    if (s == ~0ull) return;
    const uint4* src = (const uint4*)(s_dir == 0 ? host : dev + s_off);
    uint4* dst = (uint4*)(s_dir == 0 ? dev + s_off : host);
    int n = (int)(s_len >> 4);
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    __syncthreads();
    if (threadIdx.x == 0) { __threadfence_system(); *(volatile unsigned long long*)&mb->done = s; }
    last = s;
  }
}

static void report(const char* name, std::vector<double>& v) {
  std::sort(v.begin(), v.end());
  printf("%-44s median %6.2f us  p10 %6.2f  p90 %6.2f  p99 %6.2f\n", name, v[v.size()/2], v[v.size()/10], v[v.size()*9/10], v[v.size()*99/100]);
}

int main(int argc, char** argv) {
  int iters = argc > 1 ? atoi(argv[1]) : 20000;
  const size_t len = 4096;
  CK(cudaSetDeviceFlags(cudaDeviceMapHost | cudaDeviceScheduleSpin));
  char* dev; CK(cudaMalloc(&dev, 64 << 20));
  char* host; CK(cudaHostAlloc(&host, 1 << 20, cudaHostAllocMapped));
  char* hostd; CK(cudaHostGetDevicePointer((void**)&hostd, host, 0));
  Mailbox* mb; CK(cudaHostAlloc(&mb, sizeof(Mailbox), cudaHostAllocMapped));
  Mailbox* mbd; CK(cudaHostGetDevicePointer((void**)&mbd, mb, 0));
  memset(mb, 0, sizeof(*mb));
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaStream_t pst; CK(cudaStreamCreateWithFlags(&pst, cudaStreamNonBlocking));
  cudaEvent_t ev; CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  std::vector<double> t(iters);
  unsigned rng = 1;
  auto off = [&]() { rng = rng * 1103515245 + 12345; return (size_t)((rng >> 8) % ((64 << 20) / len)) * len; };

  for (int dir = 0; dir < 2; dir++) {
    for (int i = 0; i < iters; i++) {
      size_t o = off(); double a = now_us();
      if (dir == 0) CK(cudaMemcpyAsync(dev + o, host, len, cudaMemcpyHostToDevice, st)); else CK(cudaMemcpyAsync(host, dev + o, len, cudaMemcpyDeviceToHost, st));
      CK(cudaEventRecord(ev, st));
      while (cudaEventQuery(ev) == cudaErrorNotReady) {}
      t[i] = now_us() - a;
    }
    report(dir == 0 ? "memcpyAsync+event spin, write (H2D)" : "memcpyAsync+event spin, read (D2H)", t);
    for (int i = 0; i < iters; i++) {
      size_t o = off(); double a = now_us();
      if (dir == 0) copy1<<<1, 256, 0, st>>>((const uint4*)hostd, (uint4*)(dev + o), len / 16); else copy1<<<1, 256, 0, st>>>((const uint4*)(dev + o), (uint4*)hostd, len / 16);
      CK(cudaEventRecord(ev, st));
      while (cudaEventQuery(ev) == cudaErrorNotReady) {}
      t[i] = now_us() - a;
    }
    report(dir == 0 ? "kernel launch+event spin, write" : "kernel launch+event spin, read", t);
    for (int i = 0; i < iters; i++) {
      size_t o = off(); double a = now_us();
      if (dir == 0) CK(cudaMemcpyAsync(dev + o, host, len, cudaMemcpyHostToDevice, st)); else CK(cudaMemcpyAsync(host, dev + o, len, cudaMemcpyDeviceToHost, st));
      CK(cudaStreamSynchronize(st));
      t[i] = now_us() - a;
    }
    report(dir == 0 ? "memcpyAsync+streamSync(spin), write" : "memcpyAsync+streamSync(spin), read", t);
  }



  // What the engine does differently from the first rows: several streams in turn, many
  // host buffers, random offsets over a large device range.
  {
    const size_t span = 4ull << 30;
    char* big; CK(cudaMalloc(&big, span));
    CK(cudaMemset(big, 1, span));
    char* hb; CK(cudaHostAlloc(&hb, 64 << 20, cudaHostAllocMapped));
    memset(hb, 2, 64 << 20);
    cudaStream_t ss[4]; for (auto& x : ss) CK(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
    struct V { const char* name; int streams; size_t nbufs; size_t span; };
    V vs[] = {{"1 stream, 1 buffer, 64 MiB", 1, 1, 64 << 20}, {"4 streams in turn", 4, 1, 64 << 20},
              {"16384 host buffers", 1, 16384, 64 << 20}, {"random over 4 GiB", 1, 1, span},
              {"all three", 4, 16384, span}};
    for (int dir = 0; dir < 2; dir++) for (auto& v : vs) {
      for (int i = 0; i < iters; i++) {
        rng = rng * 1103515245 + 12345; size_t o = (size_t)((rng >> 4) % (v.span / len)) * len;
        rng = rng * 1103515245 + 12345; char* h = hb + (size_t)((rng >> 8) % v.nbufs) * len;
        cudaStream_t s = ss[i % v.streams];
        double a = now_us();
        if (dir == 0) CK(cudaMemcpyAsync(big + o, h, len, cudaMemcpyHostToDevice, s)); else CK(cudaMemcpyAsync(h, big + o, len, cudaMemcpyDeviceToHost, s));
        CK(cudaEventRecord(ev, s));
        while (cudaEventQuery(ev) == cudaErrorNotReady) {}
        t[i] = now_us() - a;
      }
      char name[100]; snprintf(name, sizeof name, "%s, %s", v.name, dir == 0 ? "write" : "read");
      report(name, t);
    }
    CK(cudaFree(big));
    // The engine's layout: 2 MiB chunks from cuMemCreate, each mapped at its own reservation.
    {
      CUmemAllocationProp prop = {};
      prop.type = CU_MEM_ALLOCATION_TYPE_PINNED; prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE; prop.location.id = 0;
      size_t gran = 2 << 20; int nch = (int)(span / gran);
      std::vector<CUdeviceptr> ch(nch);
      CUmemAccessDesc acc = {}; acc.location = prop.location; acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      int ok = 1;
      for (int c = 0; c < nch && ok; c++) {
        CUmemGenericAllocationHandle hdl;
        if (cuMemAddressReserve(&ch[c], gran, gran, 0, 0) || cuMemCreate(&hdl, gran, &prop, 0) || cuMemMap(ch[c], gran, 0, hdl, 0) || cuMemSetAccess(ch[c], gran, &acc, 1)) { printf("vmm setup failed at chunk %d\n", c); ok = 0; }
      }
      for (int dir = 0; ok && dir < 2; dir++) for (int sv = 0; sv < 2; sv++) {
        for (int i = 0; i < iters; i++) {
          rng = rng * 1103515245 + 12345; size_t o = (size_t)((rng >> 4) % (span / len)) * len;
          rng = rng * 1103515245 + 12345; char* h = hb + (size_t)((rng >> 8) % (sv ? 16384 : 1)) * len;
          char* d = (char*)(ch[o / gran] + (o % gran));
          cudaStream_t s = ss[sv ? i % 4 : 0];
          double a = now_us();
          if (dir == 0) CK(cudaMemcpyAsync(d, h, len, cudaMemcpyHostToDevice, s)); else CK(cudaMemcpyAsync(h, d, len, cudaMemcpyDeviceToHost, s));
          CK(cudaEventRecord(ev, s));
          while (cudaEventQuery(ev) == cudaErrorNotReady) {}
          t[i] = now_us() - a;
        }
        char name[100]; snprintf(name, sizeof name, "VMM 2 MiB chunks over 4 GiB%s, %s", sv ? " + 4 streams + 16384 bufs" : "", dir == 0 ? "write" : "read");
        report(name, t);
      }
    }
  }
  // Engine-like: a second thread (the reaper) spins on cuEventQuery and marks the op done; the
  // submitter spins on that mark. Variant b: the submitter also queries the event itself.
  for (int variant = 0; variant < 3; variant++) {
    std::atomic<long> posted{0}, seen{0};
    std::atomic<bool> stop{false};
    std::thread reaper([&] {
      CK(cudaSetDevice(0));
      long last = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        long p = posted.load(std::memory_order_acquire);
        if (p == last) { _mm_pause(); continue; }
        if (variant == 2) { continue; }  // variant 2: reaper idle-spins only (submitter queries)
        if (cudaEventQuery(ev) == cudaSuccess) { seen.store(p, std::memory_order_release); last = p; }
      }
    });
    for (int dir = 0; dir < 2; dir++) {
      for (int i = 0; i < iters; i++) {
        size_t o = off(); double a = now_us();
        if (dir == 0) CK(cudaMemcpyAsync(dev + o, host, len, cudaMemcpyHostToDevice, st)); else CK(cudaMemcpyAsync(host, dev + o, len, cudaMemcpyDeviceToHost, st));
        CK(cudaEventRecord(ev, st));
        long me = posted.fetch_add(1) + 1;
        if (variant == 0) { while (seen.load(std::memory_order_acquire) != me) _mm_pause(); }
        else { while (cudaEventQuery(ev) == cudaErrorNotReady) {} if (variant == 2) seen.store(me); }
        t[i] = now_us() - a;
        if (variant == 1) while (seen.load(std::memory_order_acquire) != me) _mm_pause();
      }
      const char* names[] = {"reaper thread queries, submitter waits", "both query (reaper + submitter)", "submitter queries, 2nd thread idle"};
      char name[100]; snprintf(name, sizeof name, "%s, %s", names[variant], dir == 0 ? "write" : "read");
      report(name, t);
    }
    stop = true; reaper.join();
  }
  int sleeps[] = {0, 100, 500, 2000};
  for (int sl : sleeps) {
    mb->seq = 0; mb->done = 0;
    persist<<<1, 256, 0, pst>>>(mbd, dev, hostd, sl);
    CK(cudaGetLastError());
    unsigned long long seq = 0;
    int bad = 0;
    for (int dir = 0; dir < 2; dir++) {
      for (int i = 0; i < iters; i++) {
        size_t o = off();
        if (dir == 0) memset(host, (char)(i + 1), len);
        double a = now_us();
        mb->dir = dir; mb->off = o; mb->len = len;
        std::atomic_thread_fence(std::memory_order_release);
        _mm_sfence();
        *(volatile unsigned long long*)&mb->seq = ++seq;
        while (*(volatile unsigned long long*)&mb->done != seq) { _mm_pause(); }
        std::atomic_thread_fence(std::memory_order_acquire);
        t[i] = now_us() - a;
        if (dir == 1 && i < 64) {
          // the block read back must be what an earlier write left there: check one byte pattern run
          char c = host[0]; for (size_t k = 1; k < len; k++) if (host[k] != c) { bad++; break; }
        }
      }
      char name[80]; snprintf(name, sizeof name, "persistent kernel (nanosleep %d), %s", sl, dir == 0 ? "write" : "read");
      report(name, t);
    }
    *(volatile unsigned long long*)&mb->seq = ~0ull;
    CK(cudaStreamSynchronize(pst));
    if (bad) printf("  %d blocks read back torn\n", bad);
  }
  // Is the data right? write a pattern through the persistent path, read it back by memcpy.
  mb->seq = 0; mb->done = 0;
  persist<<<1, 256, 0, pst>>>(mbd, dev, hostd, 100);
  unsigned long long seq = 0; int wrong = 0;
  for (int i = 0; i < 2000; i++) {
    for (size_t k = 0; k < len; k++) host[k] = (char)(i * 7 + k);
    mb->dir = 0; mb->off = (size_t)i * len; mb->len = len; _mm_sfence();
    *(volatile unsigned long long*)&mb->seq = ++seq;
    while (*(volatile unsigned long long*)&mb->done != seq) { _mm_pause(); }
  }
  *(volatile unsigned long long*)&mb->seq = ~0ull;
  CK(cudaStreamSynchronize(pst));
  std::vector<char> back(2000 * len);
  CK(cudaMemcpy(back.data(), dev, back.size(), cudaMemcpyDeviceToHost));
  for (int i = 0; i < 2000; i++) for (size_t k = 0; k < len; k++) if (back[i * len + k] != (char)(i * 7 + k)) { wrong++; break; }
  printf("persistent write path verify: %d of 2000 blocks wrong\n", wrong);
  return 0;
}
