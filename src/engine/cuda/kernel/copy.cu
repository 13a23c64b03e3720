// vramdisk's gather/scatter copy kernel: one launch carries up to 128 small copies between
// pinned, device-mapped host memory and GPU memory (either direction, mixed), so a burst of
// 4 KiB requests costs one launch instead of one DMA setup each.
//
// The descriptors travel in the kernel's parameter block (3 KiB, under the 4 KiB limit), so
// the GPU does not fetch them over PCIe. One thread block copies one descriptor; host memory
// is read or written directly through its device mapping.
//
// Built on the GPU machine with:  nvcc -ptx -arch=compute_75 -O3 copy.cu -o copy.ptx
// (compute_70 PTX is compiled for the actual GPU by the driver when the module loads).

#define MAX_DESCS 128

struct Desc {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
};

struct Batch {
    unsigned long long count;
    Desc d[MAX_DESCS];
};

extern "C" __global__ void __launch_bounds__(256)
vramdisk_copy(const __grid_constant__ Batch b)
{
    if (blockIdx.x >= b.count) return;
    const Desc d = b.d[blockIdx.x];
    const unsigned long long step = blockDim.x;
    if (((d.src | d.dst | d.len) & 15) == 0) {
        const uint4* __restrict__ s = (const uint4*)d.src;
        uint4* __restrict__ t = (uint4*)d.dst;
        const unsigned long long n = d.len >> 4;
        unsigned long long i = threadIdx.x;
        // Four independent 16-byte loads in flight per thread before the first store: reads
        // of host memory cross PCIe and take about a microsecond each.
        for (; i + 3 * step < n; i += 4 * step) {
            uint4 a = s[i], c = s[i + step], e = s[i + 2 * step], g = s[i + 3 * step];
            t[i] = a; t[i + step] = c; t[i + 2 * step] = e; t[i + 3 * step] = g;
        }
        for (; i < n; i += step) t[i] = s[i];
    } else {
        const unsigned char* __restrict__ s = (const unsigned char*)d.src;
        unsigned char* __restrict__ t = (unsigned char*)d.dst;
        for (unsigned long long i = threadIdx.x; i < d.len; i += step) t[i] = s[i];
    }
}
