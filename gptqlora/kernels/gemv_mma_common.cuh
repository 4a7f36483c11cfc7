// Shared by gemv_mma.cu and gemv_mma_stream.cu (gemv_mma.py puts the variant's defines, this file and one of
// them into one NVRTC source): the derived sizes, the 16-bit float conversions, the fragment LOP3, the mma and
// the loads. See gemv_mma.cu's header for the layout and the arithmetic.

typedef unsigned int u32;
typedef unsigned short u16;

#define BLOCK_COLS (WARPS * NT * 16)
#define SPW (4 / BITS)              // mma k-steps per 32-bit word
#define RL (64 * SPW)               // rows per 16-byte load of a lane (4 words)
#define NLOAD (KC / RL)
#define KSTEPS (KC / 16)
#define NGROUP (KSTEPS / GSTEPS)
#define CMASK (((1u << BITS) - 1u) * 0x00010001u)
#if XF16
#define MAGIC 0x64006400u           // (1024.0, 1024.0) in fp16
#define MAGIC_VAL 1024.0f
#else
#define MAGIC 0x43004300u           // (128.0, 128.0) in bf16
#define MAGIC_VAL 128.0f
#endif

__device__ __forceinline__ float x2f(u16 h) {  // x's 16-bit float -> fp32
#if XF16
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return __uint_as_float(((u32)h) << 16);
#endif
}

__device__ __forceinline__ float s2f(u16 h) {  // a scale -> fp32
#if SF16
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return __uint_as_float(((u32)h) << 16);
#endif
}

__device__ __forceinline__ u16 f2x(float f) {  // fp32 -> x's 16-bit float, round to nearest even
    u16 h;
#if XF16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

#if HAS_LORA
#if LORA_F32
typedef float lora_t;
__device__ __forceinline__ float l2f(float v) { return v; }
#else
typedef u16 lora_t;
__device__ __forceinline__ float l2f(u16 v) { return x2f(v); }
#endif
#endif

__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {  // (a & b) | c in one LOP3 (the compiler
    u32 d;                                                      // splits two immediates into two)
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
#if XF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
#endif
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ld_stream(u32* v, const u32* p) {  // 16 bytes read once: no L1 allocation
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
}

__device__ __forceinline__ float ld_cg(const float* p) {  // another block's partial: past L1
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

