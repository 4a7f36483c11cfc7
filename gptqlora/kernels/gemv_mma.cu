// Small-M GPTQ matmul on the tensor cores (kernels/gemv_mma.py compiles this with NVRTC and explains why it
// is CUDA): y (M, N) = x (M, K) @ dequant(W) (K, N) [+ s * (x Aᵀ) Bᵀ], M <= 16, 2- or 4-bit codes.
//
// The mma.m16n8k16 tile is (16 output columns) x (16 rows of K) x (8 tokens): the weights are its A operand
// (rows = output columns), x its B operand, so M = 1..8 cost one mma per tile and M = 9..16 two. Each lane's
// 32-bit word holds exactly the eight codes of its A fragment for one k-step (4 bit) or two (2 bit), packed
// by gemv_mma.pack; register i of the fragment is (word >> BITS*(4*step_in_word + i)) & CMASK | MAGIC: the
// code pair in the low bits of each half of a 16-bit float whose exponent makes the code the mantissa's units
// (MAGIC_VAL + q exactly). The mma sums x (MAGIC_VAL + q) in fp32; at each group's end (MAGIC_VAL + z) Σx of
// the group's rows comes off and the scale multiplies: s (Σ x q - z Σ x). Per 8 codes: 3 shifts, 4 LOP3 and a
// share of one mma (the fp32 sums lose ~7 bits of 24 to the offset, bf16; ~10 at fp16: errors ~1e-5).
//
// Defines (gemv_mma.py): BITS, XF16 (x fp16, else bf16), SF16 (scales fp16, else bf16), NM (8-token mma
// columns: 1 or 2), NT (16-column tiles per warp), WARPS, KC (rows per split; the grid's y), GSTEPS (16-row
// k-steps per group inside a split), HAS_PERM, HAS_LORA, LORA_F32, MAX_R, UPRE (the adapter's u = x Aᵀ comes in
// computed, (M, r) fp32 per projection in place of A, kernels/lora_u.py: no share of u per block, and u Bᵀ is
// added where a cell is stored, by the last split's sum), TAIL (the last split sums 4 cells at once), FZ (zeros
// are float (G, N) fp32, else packed along N), OUTLIERS (SpQR's outliers over W (N, K) in packed-row order,
// `pack_outliers`: each split adds Σ value * xs[pos] of its own rows, read from shared memory), SB (SpQR's
// statistics decoded in step 2 from their SB-bit codes, SG output columns a second-level group; 0: none), OSTEP
// (packed rows per outlier offset, gemv_mma.OSTEP), PDL (with UPRE: launched to overlap the u launch before it,
// waits for it before step 5), SSTATS (each group's scale and zero decoded once per block into shared memory, a
// thread per (group, column), read there by the k-steps; else each lane holds its own in registers, which caps a
// split at 8 groups: SpQR's 16-row groups then made 128-row splits, 32-86 of them a layer; SSTATS 2, SpQR only:
// the block's raw code words and second-level values copied once into shared memory, each a thread, then
// decoded from there: ~8 loads a thread, not 8 per (group, column)), OPRE (with OUTLIERS: each column's outlier
// offsets read with step 2's loads and its first OPF entries before the barrier, not both after it: two round trips
// to memory off the block's chain).

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

__device__ __forceinline__ float h2f(u16 h) {  // an fp16 value -> fp32
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float b2f(u16 h) { return __uint_as_float(((u32)h) << 16); }  // a bf16 value -> fp32

__device__ __forceinline__ float x2f(u16 h) {  // x's 16-bit float -> fp32
#if XF16
    return h2f(h);
#else
    return b2f(h);
#endif
}

__device__ __forceinline__ float s2f(u16 h) {  // a scale -> fp32
#if SF16
    return h2f(h);
#else
    return b2f(h);
#endif
}

#if SB
__device__ __forceinline__ u16 f2h(float f) {  // f rounded to fp16 (nearest even)
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float round_f16(float f) { return h2f(f2h(f)); }  // ... as fp32

// SpQR's statistics, the one formula of `col_stats` and both staged decodes (SSTATS 1 and 2):
// the SB-bit code at bit `sft` of word `lo` (its high bits from `hi` where it straddles the two words) ...
__device__ __forceinline__ float code_at(u32 lo, u32 hi, int sft) {
    u32 v = lo >> sft;
    if (sft + SB > 32) v |= hi << (32 - sft);
    return (float)(v & ((1u << SB) - 1u));
}

// ... and the statistic it codes, base + step * code as formats/spqr.py computes it (no FMA, each step rounded
// once): a scale is then rounded to fp16, a zero kept in fp32
__device__ __forceinline__ float spqr_stat(u16 step, u16 base, float code) {
    return __fadd_rn(h2f(base), __fmul_rn(h2f(step), code));
}

__device__ __forceinline__ float stat_code(const u32* codes, int grp, int col, int N) {  // SB-bit code, packed
    const int bit = col * SB, sft = bit & 31;                                                 // along N
    const u32* row = codes + (size_t)grp * (N * SB / 32) + (bit >> 5);
    return code_at(row[0], sft + SB > 32 ? row[1] : 0u, sft);
}
#endif

// one column's scale and MAGIC_VAL + zero in group `grp` (with SB decoded from SpQR's codes as formats/spqr.py
// does: scale = fp16(base + step * code), zero in fp32, each product and sum rounded once, no FMA)
__device__ __forceinline__ void col_stats(const void* scales_p, const void* zeros_p, const u16* stats, int grp,
                                          int col, int N, int G, float* s, float* zf) {
#if SB
    const int S = N / SG;
    const size_t st = (size_t)grp * S + col / SG;
    *s = round_f16(spqr_stat(stats[st], stats[G * S + st], stat_code((const u32*)scales_p, grp, col, N)));
    *zf = MAGIC_VAL + spqr_stat(stats[2 * G * S + st], stats[3 * G * S + st],
                                stat_code((const u32*)zeros_p, grp, col, N));
#else
    *s = s2f(((const u16*)scales_p)[(size_t)grp * N + col]);
#if FZ
    *zf = MAGIC_VAL + ((const float*)zeros_p)[(size_t)grp * N + col];
#else
    const int bit = col * BITS;
    const u32 word = ((const u32*)zeros_p)[(size_t)grp * (N * BITS / 32) + bit / 32];
    *zf = MAGIC_VAL + (float)((word >> (bit % 32)) & ((1u << BITS) - 1u));
#endif
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

#if HAS_LORA && UPRE
__device__ __forceinline__ float lora_cell(const float* U, const lora_t* B, int m, int row, int R) {
    float v = 0.f;  // Σ_r u[m, r] B[row, r]: one cell's adapter term
#pragma unroll 8
#if PDL  // u was written by a launch this one overlapped: read past the non-coherent path
    for (int r = 0; r < R; ++r) v += ld_cg(U + m * R + r) * l2f(B[(size_t)row * R + r]);
#else
    for (int r = 0; r < R; ++r) v += U[m * R + r] * l2f(B[(size_t)row * R + r]);
#endif
    return v;
}
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gemv_mma(const u32* __restrict__ frag,      // (N/16, K/RL, 32, 4): gemv_mma.pack's layout, rows in group order
         const u16* __restrict__ x,         // (M, K), original row order
         const int* __restrict__ perm,      // (K,): x row of each packed row (act-order), unread without HAS_PERM
         const void* __restrict__ scales_p, // (G, N) 16-bit; with SB SpQR's scale codes (G, N*SB/32) u32 along N
         const void* __restrict__ zeros_p,  // (G, N*BITS/32) u32 packed along N, or (G, N) fp32 with FZ; with
                                            // SB SpQR's zero codes (G, N*SB/32)
         const void* __restrict__ a0p, const void* __restrict__ b0p,  // LoRA A (r, K), B (N_p, r) per projection
         const void* __restrict__ a1p, const void* __restrict__ b1p,
         const void* __restrict__ a2p, const void* __restrict__ b2p,
         u16* __restrict__ out,             // (M, N)
         float* __restrict__ part,          // (split, M, N) fp32 partials (split > 1)
         int* __restrict__ locks,           // one counter per column block, zero between calls
         const u16* __restrict__ o_vals,    // OUTLIERS (gemv_mma.pack_outliers): fp16 values, int16 packed-row
         const short* __restrict__ o_pos,   // positions (sorted within a row), int32 row pointers, and int16
         const int* __restrict__ o_rows,    // offsets past each row's start of its first entry at or past each
         const short* __restrict__ o_offs,  // OSTEP rows: (N, K / OSTEP + 1)
         const u16* __restrict__ stats,     // SB: fp16 (4, G, N / SG): scales' step and base, zeros' step and base
         int M, int K, int N, int n1, int n2, int R, int group, double lora_scale, int split) {
    __shared__ __align__(16) u16 xs[NM * 8][KC + 8];  // this split's x rows, permuted; +8: no bank conflicts
#if HAS_LORA && !UPRE
    __shared__ float us[NM * 8][MAX_R];               // this split's share of u = x Aᵀ
#endif
    __shared__ float xsum[NM * 8][NGROUP];            // Σ x over each group's rows in this split, per token
#if SSTATS == 2
#define NSL (BLOCK_COLS / SG + 2)       // second-level entries a block's columns span, at most
#define NCW (BLOCK_COLS * SB / 32 + 2)  // code words they span, at most
    __shared__ u16 ssc[NGROUP][BLOCK_COLS];  // each group's scale as fp16 (exact: the decode rounds it to fp16)
    __shared__ float szf[NGROUP][BLOCK_COLS];  // MAGIC_VAL + zero
    __shared__ u16 sraw[4][NGROUP][NSL];     // the block's second-level scale step, base, zero step, base
    __shared__ u32 scw[2][NGROUP][NCW];      // the block's scale and zero code words
#elif SSTATS
    __shared__ float ssc[NGROUP][BLOCK_COLS], szf[NGROUP][BLOCK_COLS];  // each group's scale, MAGIC_VAL + zero
#endif
#if OUTLIERS
    __shared__ float osum[NM * 8][BLOCK_COLS];         // this split's outliers' share of each cell
#endif
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;            // the mma fragment's group and thread-in-group
    const int col0 = blockIdx.x * BLOCK_COLS;
    const int k0 = blockIdx.y * KC;
    const int kl0 = k0 / RL, KL = K / RL, ntiles = N / 16;

    // 1. every weight load of this warp first: NT tiles x NLOAD x 16 bytes in flight per lane
    u32 w[NT][NLOAD][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tile = col0 / 16 + warp * NT + j;
#pragma unroll
        for (int l = 0; l < NLOAD; ++l) {
            if (tile < ntiles) {
                ld_stream(w[j][l], frag + ((size_t)(tile * KL + kl0 + l) * 32 + lane) * 4);
            } else {
                w[j][l][0] = w[j][l][1] = w[j][l][2] = w[j][l][3] = 0u;
            }
        }
    }

    // 2. scales and MAGIC_VAL + zero of each group of the split (`col_stats`; with SB from SpQR's codes: ~0.6 bits a
    // weight read instead of the decoded 3). SSTATS: a thread per (group, column) of the block into shared memory;
    // else this lane's two columns (g, g + 8) of each of its tiles into registers
    const int G = K / group;
#if OUTLIERS && OPRE
#define OCOLS ((BLOCK_COLS + WARPS * 32 - 1) / (WARPS * 32))  // columns a thread sums the outliers of
#define OPF 4                                                 // entries of each read before the barrier
    int oe0[OCOLS], oe1[OCOLS];  // this split's entries of the thread's columns: [oe0, oe1)
#pragma unroll
    for (int q = 0; q < OCOLS; ++q) {
        const int c = tid + q * WARPS * 32, n = col0 + c;
        oe0[q] = oe1[q] = 0;
        if (c < BLOCK_COLS && n < N) {
            const short* offs = o_offs + (size_t)n * (K / OSTEP + 1);
            const int base = o_rows[n];
            oe0[q] = base + offs[k0 / OSTEP];
            oe1[q] = base + offs[(k0 + KC) / OSTEP];
        }
    }
#endif
#if SSTATS == 2
    // the raw values only (their decode waits for the barrier after step 3): all of a thread's loads, then its
    // stores, so the loads are in flight together
    const int S = N / SG, cend = min(col0 + BLOCK_COLS, N), ns0 = col0 / SG, w0 = col0 * SB / 32;
    const int nsl = (cend - 1) / SG - ns0 + 1, ncw = (cend * SB - 1) / 32 - w0 + 1;
#define RAWN (4 * NGROUP * NSL + 2 * NGROUP * NCW)
#define RITERS ((RAWN + WARPS * 32 - 1) / (WARPS * 32))
    {
        u32 rv[RITERS];
#pragma unroll
        for (int it = 0; it < RITERS; ++it) {
            const int i = tid + it * WARPS * 32;
            rv[it] = 0u;
            if (i < 4 * NGROUP * NSL) {
                const int q = i / (NGROUP * NSL), r = i - q * (NGROUP * NSL), gi = r / NSL, e = r - gi * NSL;
                if (e < nsl)
                    rv[it] = stats[(size_t)q * G * S + (size_t)((k0 + gi * GSTEPS * 16) / group) * S + ns0 + e];
            } else if (i < RAWN) {
                const int r0 = i - 4 * NGROUP * NSL, wh = r0 / (NGROUP * NCW), r = r0 - wh * (NGROUP * NCW);
                const int gi = r / NCW, e = r - gi * NCW;
                if (e < ncw)
                    rv[it] = ((const u32*)(wh ? zeros_p : scales_p))[(size_t)((k0 + gi * GSTEPS * 16) / group) *
                                                                       (N * SB / 32) + w0 + e];
            }
        }
#pragma unroll
        for (int it = 0; it < RITERS; ++it) {
            const int i = tid + it * WARPS * 32;
            if (i < 4 * NGROUP * NSL) {
                const int q = i / (NGROUP * NSL), r = i - q * (NGROUP * NSL);
                sraw[q][r / NSL][r % NSL] = (u16)rv[it];
            } else if (i < RAWN) {
                const int r0 = i - 4 * NGROUP * NSL, wh = r0 / (NGROUP * NCW), r = r0 - wh * (NGROUP * NCW);
                scw[wh][r / NCW][r % NCW] = rv[it];
            }
        }
    }
#define SC(j, gi, h) h2f(ssc[gi][(warp * NT + (j)) * 16 + g + 8 * (h)])
#define ZF(j, gi, h) szf[gi][(warp * NT + (j)) * 16 + g + 8 * (h)]
#elif SSTATS
#define SITERS ((NGROUP * BLOCK_COLS + WARPS * 32 - 1) / (WARPS * 32))  // (group, column) passes a thread
#define SCHUNK 8  // passes whose loads are in flight together (8 x 8 registers)
#if SB
    // in chunks of SCHUNK passes: every raw load of a chunk first (4 fp16 steps and bases, the code words), then
    // their decode. Written as one pass at a time, ptxas kept each pass's ~8 loads beside their use: 16 round
    // trips to memory in a row before the first k-step at the 7B's shapes (SASS, sm_90)
    const int S = N / SG;
#pragma unroll
    for (int c0 = 0; c0 < SITERS; c0 += SCHUNK) {
        u16 raw[SCHUNK][4];
        u32 cw[SCHUNK][2][2];  // scale's and zero's code: its word and the next where the code straddles them
#pragma unroll
        for (int u = 0; u < SCHUNK; ++u) {
            const int i = tid + (c0 + u) * WARPS * 32, gi = i / BLOCK_COLS, col = col0 + i - gi * BLOCK_COLS;
            const bool ok = c0 + u < SITERS && i < NGROUP * BLOCK_COLS && col < N;
            const int grp = (k0 + gi * GSTEPS * 16) / group, bit = col * SB;
            const size_t st = (size_t)grp * S + col / SG, wd = (size_t)grp * (N * SB / 32) + (bit >> 5);
            const bool two = ok && (bit & 31) + SB > 32;
#pragma unroll
            for (int q = 0; q < 4; ++q) raw[u][q] = ok ? stats[q * G * S + st] : (u16)0;
            cw[u][0][0] = ok ? ((const u32*)scales_p)[wd] : 0u;
            cw[u][0][1] = two ? ((const u32*)scales_p)[wd + 1] : 0u;
            cw[u][1][0] = ok ? ((const u32*)zeros_p)[wd] : 0u;
            cw[u][1][1] = two ? ((const u32*)zeros_p)[wd + 1] : 0u;
        }
#pragma unroll
        for (int u = 0; u < SCHUNK; ++u) {
            const int i = tid + (c0 + u) * WARPS * 32, gi = i / BLOCK_COLS, c = i - gi * BLOCK_COLS;
            if (c0 + u < SITERS && i < NGROUP * BLOCK_COLS) {  // as col_stats: no FMA, each step rounded once
                const int sh = ((col0 + c) * SB) & 31;
                float q[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) q[e] = code_at(cw[u][e][0], cw[u][e][1], sh);
                float sv = 0.f, zv = MAGIC_VAL;
                if (col0 + c < N) {
                    sv = round_f16(spqr_stat(raw[u][0], raw[u][1], q[0]));
                    zv = MAGIC_VAL + spqr_stat(raw[u][2], raw[u][3], q[1]);
                }
                ssc[gi][c] = sv;
                szf[gi][c] = zv;
            }
        }
    }
#else
#pragma unroll
    for (int it = 0; it < SITERS; ++it) {
        const int i = tid + it * WARPS * 32, gi = i / BLOCK_COLS, c = i - gi * BLOCK_COLS;
        float sv = 0.f, zv = MAGIC_VAL;
        if (i < NGROUP * BLOCK_COLS && col0 + c < N)
            col_stats(scales_p, zeros_p, stats, (k0 + gi * GSTEPS * 16) / group, col0 + c, N, G, &sv, &zv);
        if (i < NGROUP * BLOCK_COLS) {
            ssc[gi][c] = sv;
            szf[gi][c] = zv;
        }
    }
#endif
#define SC(j, gi, h) ssc[gi][(warp * NT + (j)) * 16 + g + 8 * (h)]
#define ZF(j, gi, h) szf[gi][(warp * NT + (j)) * 16 + g + 8 * (h)]
#else
    float sc[NT][NGROUP][2], zf[NT][NGROUP][2];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tile = col0 / 16 + warp * NT + j;
#pragma unroll
        for (int gi = 0; gi < NGROUP; ++gi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                sc[j][gi][h] = 0.f;
                zf[j][gi][h] = MAGIC_VAL;
                if (tile < ntiles)
                    col_stats(scales_p, zeros_p, stats, (k0 + gi * GSTEPS * 16) / group, tile * 16 + g + 8 * h, N, G,
                              &sc[j][gi][h], &zf[j][gi][h]);
            }
    }
#define SC(j, gi, h) sc[j][gi][h]
#define ZF(j, gi, h) zf[j][gi][h]
#endif

    // 3. x rows of this split into shared memory, in packed-row order, rows >= M zero: a thread per packed row,
    // its source row read once, then the M tokens' values, all loads in flight together (session 20, H100, M = 8:
    // 44.1 against 47.7 us at 4096x22016 for an element a thread per pass; within 0.6 us at the other shapes)
#pragma unroll
    for (int kk = tid; kk < KC; kk += WARPS * 32) {
#if HAS_PERM
        const int k = perm[k0 + kk];
#else
        const int k = k0 + kk;
#endif
        u16 v[NM * 8];
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) v[m] = m < M ? x[(size_t)m * K + k] : (u16)0;
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) xs[m][kk] = v[m];
    }
#if HAS_LORA
    // this block's projection; without UPRE, this split's u = x Aᵀ over rows [k0, k0 + KC) in the original order
    // (the sum over splits is all of K)
    const int proj = col0 < n1 ? 0 : (col0 < n2 ? 1 : 2);
    const lora_t* B = (const lora_t*)(proj == 0 ? b0p : (proj == 1 ? b1p : b2p));
    const int noff = proj == 0 ? 0 : (proj == 1 ? n1 : n2);
#if UPRE
    // (M, r): all of K, added where cells are stored
    const float* U = (const float*)(proj == 0 ? a0p : (proj == 1 ? a1p : a2p));
#else
    const lora_t* A = (const lora_t*)(proj == 0 ? a0p : (proj == 1 ? a1p : a2p));
    for (int r = warp; r < R; r += WARPS) {  // a warp per rank, every token at once: A's row read once
        float acc[NM * 8];
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) acc[m] = 0.f;
#pragma unroll 8
        for (int kk = lane; kk < KC; kk += 32) {
            const float a = l2f(A[(size_t)r * K + k0 + kk]);
#pragma unroll
            for (int m = 0; m < NM * 8; ++m)
                if (m < M) acc[m] += x2f(x[(size_t)m * K + k0 + kk]) * a;
        }
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) {
            if (m >= M) break;  // warp-uniform
            float v = acc[m];
#pragma unroll
            for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) us[m][r] = v;
        }
    }
#endif  // UPRE
#endif
#if OUTLIERS && OPRE
    u32 opv[OCOLS][OPF];  // the first OPF entries of each column: values and positions, in flight over the barrier
    int opp[OCOLS][OPF];
#pragma unroll
    for (int q = 0; q < OCOLS; ++q)
#pragma unroll
        for (int u = 0; u < OPF; ++u) {
            const bool ok = oe0[q] + u < oe1[q];
            opv[q][u] = ok ? o_vals[oe0[q] + u] : 0u;
            opp[q][u] = ok ? o_pos[oe0[q] + u] : k0;
        }
#endif
    __syncthreads();
#if OUTLIERS && OPRE
#pragma unroll
    for (int q = 0; q < OCOLS; ++q) {
        const int c = tid + q * WARPS * 32;
        if (c >= BLOCK_COLS) break;
        float o[NM * 8];
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) o[m] = 0.f;
#pragma unroll
        for (int u = 0; u < OPF; ++u) {  // in entry order, as the loop below: the same sums
            if (oe0[q] + u < oe1[q]) {
                const float v = h2f((u16)opv[q][u]);
                const int kk = opp[q][u] - k0;
#pragma unroll
                for (int m = 0; m < NM * 8; ++m) o[m] += v * x2f(xs[m][kk]);
            }
        }
        for (int e = oe0[q] + OPF; e < oe1[q]; ++e) {  // the rest (rare: ~1-3 a split)
            const float v = h2f(o_vals[e]);
            const int kk = o_pos[e] - k0;
#pragma unroll
            for (int m = 0; m < NM * 8; ++m) o[m] += v * x2f(xs[m][kk]);
        }
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) osum[m][c] = o[m];
    }
#elif OUTLIERS
    // a thread per column: Σ value * x over the column's outliers in this split's rows, x from shared memory.
    // Split 0 walking all of a column's (~1% of K: 41 at K = 4096, 110 at 11008) was one long chain per thread
    // (session 19: SpQR through this kernel 0.48x bf16); a split holds ~1-3 of them
    for (int c = tid; c < BLOCK_COLS; c += WARPS * 32) {
        const int n = col0 + c;
        float o[NM * 8];
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) o[m] = 0.f;
        if (n < N) {
            const short* offs = o_offs + (size_t)n * (K / OSTEP + 1);
            const int base = o_rows[n], e1 = base + offs[(k0 + KC) / OSTEP];
            for (int e = base + offs[k0 / OSTEP]; e < e1; ++e) {
                const float v = h2f(o_vals[e]);
                const int kk = o_pos[e] - k0;
#pragma unroll
                for (int m = 0; m < NM * 8; ++m) o[m] += v * x2f(xs[m][kk]);  // rows >= M: zero
            }
        }
#pragma unroll
        for (int m = 0; m < NM * 8; ++m) osum[m][c] = o[m];
    }
#endif
#if SSTATS == 2
    // each (group, column)'s scale and zero from the staged raw values, as col_stats does (no FMA, each step
    // rounded once; the scale kept as the fp16 it rounds to)
    for (int i = tid; i < NGROUP * BLOCK_COLS; i += WARPS * 32) {
        const int gi = i / BLOCK_COLS, c = i - gi * BLOCK_COLS, col = col0 + c;
        u16 sh = 0;
        float zv = MAGIC_VAL;
        if (col < N) {
            const int e = col / SG - ns0, bit = col * SB - w0 * 32, wd = bit >> 5, sft = bit & 31;
            float q[2];
#pragma unroll
            for (int wh = 0; wh < 2; ++wh)
                q[wh] = code_at(scw[wh][gi][wd], sft + SB > 32 ? scw[wh][gi][wd + 1] : 0u, sft);
            sh = f2h(spqr_stat(sraw[0][gi][e], sraw[1][gi][e], q[0]));
            zv = MAGIC_VAL + spqr_stat(sraw[2][gi][e], sraw[3][gi][e], q[1]);
        }
        ssc[gi][c] = sh;
        szf[gi][c] = zv;
    }
#endif
    for (int i = warp; i < NM * 8 * NGROUP; i += WARPS) {  // Σ x of each group's rows, a warp each, once xs is in
        const int m = i / NGROUP, gi = i - m * NGROUP;
        float v = 0.f;
        if (m >= M) {  // warp-uniform: a zero row's sum is zero (its cells are never stored)
            if (lane == 0) xsum[m][gi] = 0.f;
            continue;
        }
        for (int r = lane; r < GSTEPS * 16; r += 32) v += x2f(xs[m][gi * GSTEPS * 16 + r]);
#pragma unroll
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) xsum[m][gi] = v;
    }
    __syncthreads();

#if HAS_LORA && !UPRE
    // the adapter's share of each cell of this lane (see 5.), before the k-steps: B's row of each of the lane's
    // columns read once, its loads in flight while the weights still arrive
    float lo[NT][NM][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tile = col0 / 16 + warp * NT + j;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float d[NM][2];
#pragma unroll
            for (int mm = 0; mm < NM; ++mm) d[mm][0] = d[mm][1] = 0.f;
            if (tile < ntiles) {
                const lora_t* brow = B + (size_t)(tile * 16 + g + 8 * h - noff) * R;
#pragma unroll 8
                for (int r = 0; r < R; ++r) {
                    const float bv = l2f(brow[r]);
#pragma unroll
                    for (int mm = 0; mm < NM; ++mm) {  // rows m >= M: garbage, their cells never written
                        d[mm][0] += us[mm * 8 + 2 * t][r] * bv;
                        d[mm][1] += us[mm * 8 + 2 * t + 1][r] * bv;
                    }
                }
            }
#pragma unroll
            for (int mm = 0; mm < NM; ++mm) {
                lo[j][mm][2 * h] = d[mm][0];
                lo[j][mm][2 * h + 1] = d[mm][1];
            }
        }
    }
#endif

    // 4. the k-steps: 16 rows each, every tile of the warp; the group's fp32 sum scaled at its end
    u32 cmask = CMASK, magic = MAGIC;  // in registers: one LOP3 per fragment register
    asm volatile("" : "+r"(cmask), "+r"(magic));
    float tot[NT][NM][4], acc[NT][NM][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int mm = 0; mm < NM; ++mm)
#pragma unroll
            for (int c = 0; c < 4; ++c) tot[j][mm][c] = acc[j][mm][c] = 0.f;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
        const int l = s / (4 * SPW), wi = (s / SPW) & 3, sl = s % SPW, gi = s / GSTEPS;
        u32 b[NM][2];
#pragma unroll
        for (int mm = 0; mm < NM; ++mm) {
            b[mm][0] = *(const u32*)&xs[mm * 8 + g][s * 16 + 2 * t];
            b[mm][1] = *(const u32*)&xs[mm * 8 + g][s * 16 + 2 * t + 8];
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const u32 word = w[j][l][wi];
            u32 a[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                a[i] = and_or(word >> (BITS * (4 * sl + i)), cmask, magic);
#pragma unroll
            for (int mm = 0; mm < NM; ++mm) mma(acc[j][mm], a, b[mm][0], b[mm][1]);
            if ((s + 1) % GSTEPS == 0) {
                const float s2[2] = {SC(j, gi, 0), SC(j, gi, 1)}, z2[2] = {ZF(j, gi, 0), ZF(j, gi, 1)};
#pragma unroll
                for (int mm = 0; mm < NM; ++mm)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        acc[j][mm][c] -= z2[c >> 1] * xsum[mm * 8 + 2 * t + (c & 1)][gi];
                        tot[j][mm][c] += s2[c >> 1] * acc[j][mm][c];
                        acc[j][mm][c] = 0.f;
                    }
            }
        }
    }

#if PDL && __CUDA_ARCH__ >= 900
    // launched before lora_u (the launch before this one) finished, programmatic dependent launch: wait for
    // it (its u complete and visible) before the cells below read u. Everything above overlapped it
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

    // 5. each cell of this lane (c0, c1 = column g, tokens 2t, 2t+1; c2, c3 = column g + 8): the adapter's share
    // and this split's outliers added, then out directly (one split) or as an fp32 partial the last split sums
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tile = col0 / 16 + warp * NT + j;
#pragma unroll
        for (int mm = 0; mm < NM; ++mm)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int n = tile * 16 + g + 8 * (c >> 1), m = mm * 8 + 2 * t + (c & 1);
                if (tile < ntiles && m < M) {
                    float v = tot[j][mm][c];
#if HAS_LORA && !UPRE
                    v += (float)lora_scale * lo[j][mm][c];
#elif HAS_LORA
                    if (split == 1) v += (float)lora_scale * lora_cell(U, B, m, n - noff, R);
#endif
#if OUTLIERS
                    v += osum[m][n - col0];
#endif
                    if (split == 1)
                        out[(size_t)m * N + n] = f2x(v);
                    else
                        part[((size_t)blockIdx.y * M + m) * N + n] = v;
                }
            }
    }
    if (split == 1) return;
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(&locks[blockIdx.x], 1) == split - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // each cell's partials summed in split order. TAIL 1, where the block has 4+ cells a thread (M = 8 at 128
    // columns): 4 cells at once, 4 splits a round, 16 loads in flight (TAIL 0 and fewer cells: a cell at a
    // time, 8 splits a round: 4 cells x 43 splits of 11008x4096 took 24 round trips to L2, now 11)
#if TAIL
    if (M * BLOCK_COLS >= 4 * WARPS * 32) {
        for (int i0 = tid; i0 < M * BLOCK_COLS; i0 += 4 * WARPS * 32) {
            float v[4];
            int mi[4], ni[4];
            bool ok[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int i = i0 + c * WARPS * 32;
                mi[c] = i / BLOCK_COLS;
                ni[c] = col0 + (i - mi[c] * BLOCK_COLS);
                ok[c] = i < M * BLOCK_COLS && ni[c] < N;
                v[c] = 0.f;
            }
            for (int p = 0; p < split; p += 4) {
                float pv[4][4];
#pragma unroll
                for (int q = 0; q < 4; ++q)
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        pv[q][c] = ok[c] && p + q < split
                                       ? ld_cg(part + ((size_t)(p + q) * M + mi[c]) * N + ni[c]) : 0.f;
#pragma unroll
                for (int q = 0; q < 4; ++q)
#pragma unroll
                    for (int c = 0; c < 4; ++c) v[c] += pv[q][c];
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                if (!ok[c]) continue;
#if HAS_LORA && UPRE
                v[c] += (float)lora_scale * lora_cell(U, B, mi[c], ni[c] - noff, R);
#endif
                out[(size_t)mi[c] * N + ni[c]] = f2x(v[c]);
            }
        }
        if (tid == 0) locks[blockIdx.x] = 0;
        return;
    }
#endif
    for (int i = tid; i < M * BLOCK_COLS; i += WARPS * 32) {
        const int m = i / BLOCK_COLS, n = col0 + (i - m * BLOCK_COLS);
        if (n < N) {  // eight loads in flight at a time, not one
            float v = 0.f;
            int p = 0;
            for (; p + 8 <= split; p += 8) {
                float pv[8];
#pragma unroll
                for (int q = 0; q < 8; ++q) pv[q] = ld_cg(part + ((size_t)(p + q) * M + m) * N + n);
#pragma unroll
                for (int q = 0; q < 8; ++q) v += pv[q];
            }
            for (; p < split; ++p) v += ld_cg(part + ((size_t)p * M + m) * N + n);
#if HAS_LORA && UPRE
            v += (float)lora_scale * lora_cell(U, B, m, n - noff, R);
#endif
            out[(size_t)m * N + n] = f2x(v);
        }
    }
    if (tid == 0) locks[blockIdx.x] = 0;
}
