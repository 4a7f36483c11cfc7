// gemv_mma.cu's product by persistent blocks that stream the weights through shared memory (opt-in:
// GPTQLORA_GEMV_MMA=stream; gemv_mma.py compiles it when the variant's STREAM define is set).
//
// Why: session 16 measured gemv_mma.cu at 1.0-1.2 TB/s on the 7B shapes (bf16 2.8-3.0). Each of its blocks is
// one (column block, split) item and a serial chain: the weights arrive, x is gathered through perm, the
// adapter's share is computed, the k-steps run, the partial is stored, fenced and counted. With one or two
// blocks an SM, nothing is in flight during most links of the chain. Here a block is resident for the whole
// call and walks a contiguous range of items (split-major: item = split * column blocks + column block):
// - the weights of the next STREAM - 1 items are in flight (cp.async into a ring of shared stages: each lane
//   copies and later reads back only its own 16-byte chunks, so no barrier guards the ring);
// - x, Σx per group and the adapter's u = x Aᵀ are built once per (split, projection), not once per item;
// - an item's partial is fenced and counted during the next item (its stores have long landed by then; the
//   counter's reply is read after the next item's k-steps), so neither round trip is waited for in line.
// The k-steps and the cells' arithmetic are gemv_mma.cu's, so are the layouts, the partials (split, M, N) and
// the counters (one per column block, zero between calls; the last of a column block sums the partials in
// split order and resets it).
//
// Defines: gemv_mma.cu's, with STREAM the number of shared stages (>= 2). No OUTLIERS (SpQR keeps gemv_mma.cu).
// Dynamic shared memory: STREAM * WARPS * NT * NLOAD * 512 bytes (gemv_mma.py sets the limit and the grid: as
// many blocks as are resident at once, at most one per item).

#if OUTLIERS
#error "gemv_mma_stream.cu takes no outliers: SpQR layers decode through gemv_mma.cu"
#endif

#define STAGE_WORDS (WARPS * NT * NLOAD * 128)  // u32 words of one stage: every lane's 16-byte chunks of one item

__device__ __forceinline__ u32 smem_u32(const void* p) {  // a shared-memory pointer as cp.async's 32-bit address
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {  // bytes 0: zero fill, no read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_wait() {  // at most N of this thread's committed groups still in flight
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gemv_mma(const u32* __restrict__ frag,      // (N/16, K/RL, 32, 4): gemv_mma.pack's layout, rows in group order
         const u16* __restrict__ x,         // (M, K), original row order
         const int* __restrict__ perm,      // (K,): x row of each packed row (act-order), unread without HAS_PERM
         const u16* __restrict__ scales,    // (G, N)
         const void* __restrict__ zeros_p,  // (G, N*BITS/32) u32 packed along N, or (G, N) fp32 with FZ
         const void* __restrict__ a0p, const void* __restrict__ b0p,  // LoRA A (r, K), B (N_p, r) per projection
         const void* __restrict__ a1p, const void* __restrict__ b1p,
         const void* __restrict__ a2p, const void* __restrict__ b2p,
         u16* __restrict__ out,             // (M, N)
         float* __restrict__ part,          // (split, M, N) fp32 partials (split > 1)
         int* __restrict__ locks,           // one counter per column block, zero between calls
         const u16* __restrict__ o_vals,    // unused (gemv_mma.cu's outliers): the same arguments for both kernels
         const short* __restrict__ o_cols, const int* __restrict__ o_rows,
         int M, int K, int N, int n1, int n2, int R, int group, double lora_scale, int split) {
    extern __shared__ __align__(16) u32 wbuf[];       // (STREAM, WARPS, NT, NLOAD, 32, 4)
    __shared__ __align__(16) u16 xs[NM * 8][KC + 8];  // the current split's x rows, permuted
#if HAS_LORA
    __shared__ float us[NM * 8][MAX_R];               // the current split's share of u = x Aᵀ (current projection)
#endif
    __shared__ float xsum[NM * 8][NGROUP];            // Σ x over each group's rows in the current split, per token
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int KL = K / RL, ntiles = N / 16;
    const int ncb = (N + BLOCK_COLS - 1) / BLOCK_COLS, items = ncb * split;
    const int i0 = (int)((long long)blockIdx.x * items / gridDim.x);
    const int i1 = (int)((long long)(blockIdx.x + 1) * items / gridDim.x);
    u32* const mine = wbuf + warp * (NT * NLOAD * 128) + lane * 4;  // + stage * STAGE_WORDS + (j * NLOAD + l) * 128

    // this lane's chunks of item `it` into `stage` (tiles past N: zero-filled, nothing read)
    auto issue = [&](int it, int stage) {
        const int sp = it / ncb, cb = it - sp * ncb;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int tile = cb * (BLOCK_COLS / 16) + warp * NT + j;
            const bool ok = tile < ntiles;
#pragma unroll
            for (int l = 0; l < NLOAD; ++l)
                cp_async16(smem_u32(mine + stage * STAGE_WORDS + (j * NLOAD + l) * 128),
                           frag + ((size_t)((ok ? tile : 0) * KL + sp * NLOAD + l) * 32 + lane) * 4, ok ? 16 : 0);
        }
    };
    // the partials of column block cb summed in split order into out (by the block that counted last), eight
    // loads in flight at a time; the counter reset for the next call
    auto sum_partials = [&](int cb) {
        const int col0 = cb * BLOCK_COLS;
        __threadfence();
        for (int i = tid; i < M * BLOCK_COLS; i += WARPS * 32) {
            const int m = i / BLOCK_COLS, n = col0 + (i - m * BLOCK_COLS);
            if (n < N) {
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
                out[(size_t)m * N + n] = f2x(v);
            }
        }
        if (tid == 0) locks[cb] = 0;
    };

#pragma unroll 1
    for (int s = 0; s < STREAM - 1; ++s) {  // the pipeline's first STREAM - 1 items, a commit group each
        if (i0 + s < i1) issue(i0 + s, s);
        cp_commit();
    }
    u32 cmask = CMASK, magic = MAGIC;  // in registers: one LOP3 per fragment register
    asm volatile("" : "+r"(cmask), "+r"(magic));
    int ctx = -1;      // the (split, projection) whose x, Σx and u are in shared memory
    int counted = -1;  // the column block of the previous item, whose partial is still to be counted
#pragma unroll 1
    for (int it = i0; it < i1; ++it) {
        const int q = it - i0, stage = q % STREAM;
        if (it + STREAM - 1 < i1) issue(it + STREAM - 1, (q + STREAM - 1) % STREAM);  // the slot item it - 1 read
        cp_commit();  // (empty groups keep the count: group q is item it)
        const int sp = it / ncb, cb = it - sp * ncb;
        const int col0 = cb * BLOCK_COLS, k0 = sp * KC;

        // scales and MAGIC_VAL + zero of this lane's two columns (g, g + 8) in each group of the split
        float sc[NT][NGROUP][2], zf[NT][NGROUP][2];
#if FZ
        const float* zeros = (const float*)zeros_p;
#else
        const u32* zeros = (const u32*)zeros_p;
#endif
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int tile = col0 / 16 + warp * NT + j;
#pragma unroll
            for (int gi = 0; gi < NGROUP; ++gi) {
                const int grp = (k0 + gi * GSTEPS * 16) / group;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int col = tile * 16 + g + 8 * h;
                    float s = 0.f, z = 0.f;
                    if (tile < ntiles) {
                        s = s2f(scales[(size_t)grp * N + col]);
#if FZ
                        z = zeros[(size_t)grp * N + col];
#else
                        const int bit = col * BITS;
                        z = (float)((zeros[(size_t)grp * (N * BITS / 32) + bit / 32] >> (bit % 32)) & ((1u << BITS) - 1u));
#endif
                    }
                    sc[j][gi][h] = s;
                    zf[j][gi][h] = MAGIC_VAL + z;
                }
            }
        }

#if HAS_LORA
        const int proj = col0 < n1 ? 0 : (col0 < n2 ? 1 : 2);
#else
        const int proj = 0;
#endif
        if (sp * 4 + proj != ctx) {  // a new split or projection: x, Σx and u rebuilt (a few times per block)
            __syncthreads();  // every warp is done reading the previous ones
            for (int i = tid; i < NM * 8 * KC; i += WARPS * 32) {
                const int m = i / KC, kk = i - m * KC;
                u16 v = 0;
                if (m < M) {
                    const int k = k0 + kk;
#if HAS_PERM
                    v = x[(size_t)m * K + perm[k]];
#else
                    v = x[(size_t)m * K + k];
#endif
                }
                xs[m][kk] = v;
            }
#if HAS_LORA
            {  // this split's u = x Aᵀ over rows [k0, k0 + KC) in the original order, a warp per rank
                const lora_t* A = (const lora_t*)(proj == 0 ? a0p : (proj == 1 ? a1p : a2p));
                for (int r = warp; r < R; r += WARPS) {
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
            }
#endif
            __syncthreads();
            for (int i = warp; i < NM * 8 * NGROUP; i += WARPS) {
                const int m = i / NGROUP, gi = i - m * NGROUP;
                float v = 0.f;
                for (int r = lane; r < GSTEPS * 16; r += 32) v += x2f(xs[m][gi * GSTEPS * 16 + r]);
#pragma unroll
                for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0) xsum[m][gi] = v;
            }
            __syncthreads();
            ctx = sp * 4 + proj;
        }

#if HAS_LORA
        // the adapter's share of each cell of this lane (B's row of each column read once), as gemv_mma.cu
        float lo[NT][NM][4];
        {
            const lora_t* B = (const lora_t*)(proj == 0 ? b0p : (proj == 1 ? b1p : b2p));
            const int noff = proj == 0 ? 0 : (proj == 1 ? n1 : n2);
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
                            for (int mm = 0; mm < NM; ++mm) {
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
        }
#endif

        // the previous item's partial: its stores have had this item's prologue to land; fenced, then counted
        // (the reply is read after the k-steps)
        int reply = -1;
        if (counted >= 0) {
            __threadfence();
            __syncthreads();  // every thread's partial stores fenced before the count
            if (tid == 0) reply = atomicAdd(&locks[counted], 1);
        }

        // the k-steps, gemv_mma.cu's, with each lane's 16-byte chunks read back from its own slots of the stage
        cp_wait<STREAM - 1>();  // group q, this item's, has landed
        const u32* wst = mine + stage * STAGE_WORDS;
        float tot[NT][NM][4], acc[NT][NM][4];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int mm = 0; mm < NM; ++mm)
#pragma unroll
                for (int c = 0; c < 4; ++c) tot[j][mm][c] = acc[j][mm][c] = 0.f;
        uint4 w4[NT];
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s) {
            const int l = s / (4 * SPW), wi = (s / SPW) & 3, sl = s % SPW, gi = s / GSTEPS;
            if (s % (4 * SPW) == 0) {
#pragma unroll
                for (int j = 0; j < NT; ++j) w4[j] = *(const uint4*)(wst + (j * NLOAD + l) * 128);
            }
            u32 b[NM][2];
#pragma unroll
            for (int mm = 0; mm < NM; ++mm) {
                b[mm][0] = *(const u32*)&xs[mm * 8 + g][s * 16 + 2 * t];
                b[mm][1] = *(const u32*)&xs[mm * 8 + g][s * 16 + 2 * t + 8];
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const u32 word = wi == 0 ? w4[j].x : (wi == 1 ? w4[j].y : (wi == 2 ? w4[j].z : w4[j].w));
                u32 a[4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    a[i] = and_or(word >> (BITS * (4 * sl + i)), cmask, magic);
#pragma unroll
                for (int mm = 0; mm < NM; ++mm) mma(acc[j][mm], a, b[mm][0], b[mm][1]);
                if ((s + 1) % GSTEPS == 0) {
#pragma unroll
                    for (int mm = 0; mm < NM; ++mm)
#pragma unroll
                        for (int c = 0; c < 4; ++c) {
                            acc[j][mm][c] -= zf[j][gi][c >> 1] * xsum[mm * 8 + 2 * t + (c & 1)][gi];
                            tot[j][mm][c] += sc[j][gi][c >> 1] * acc[j][mm][c];
                            acc[j][mm][c] = 0.f;
                        }
                }
            }
        }

        if (counted >= 0) {  // the previous item's count: the last of its column block sums it
            if (tid == 0) s_last = reply == split - 1;
            __syncthreads();
            if (s_last) sum_partials(counted);
            counted = -1;
        }

        // this item's cells (gemv_mma.cu's step 5): out directly (one split) or its fp32 partial
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
#if HAS_LORA
                        v += (float)lora_scale * lo[j][mm][c];
#endif
                        if (split == 1)
                            out[(size_t)m * N + n] = f2x(v);
                        else
                            part[((size_t)sp * M + m) * N + n] = v;
                    }
                }
        }
        if (split > 1) counted = cb;
    }
    if (counted >= 0) {  // the range's last item, counted in line
        __threadfence();
        __syncthreads();
        if (tid == 0) s_last = atomicAdd(&locks[counted], 1) == split - 1;
        __syncthreads();
        if (s_last) sum_partials(counted);
    }
    cp_wait<0>();
}
