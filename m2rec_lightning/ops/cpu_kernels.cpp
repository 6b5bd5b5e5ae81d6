// CPU kernels, the fast paths beside their PyTorch references (cpu_kernels.py): Mamba-1's two sequence kernels below,
// then (further down, each with its own comment) Mamba's fused forward_last, the serving steps, the Fourier filter's
// convolution, the stream gate and the cross-entropy's chunk passes
//
// the selective scan (S6 recurrence)
//     dt  = softplus(delta + delta_bias)        (each part optional)
//     h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t    h: (dstate, dim) per batch row, h_{-1} = 0
//     y_t = (C_t . h_t + D u_t) silu(z_t)
// and the causal depthwise convolution with its SiLU
//     y_t = silu(bias + sum_j w_j x_{t-K+1+j})  (x_{<0} = 0)
//
// Built by cpu_kernels.py with g++ -O3 -march=native -ffast-math -fopenmp, linked without -ffast-math (see there). The
// inner loops run over dim with unit stride and no reduction, vectorised (`omp simd`), with fast_exp2 inlined for
// float32; with AVX-512 the state update, the hot loop, is written with intrinsics (advance_avx512). Layouts: every
// sequence tensor is batch-major, (batch, seqlen, ·), its last dimension contiguous; an input may have any row stride
// (so the x and z halves of in_proj's output and the B and C columns of x_proj's are read in place), outputs and
// gradients are contiguous. A is (dstate, dim), the transpose of Mamba's; the conv weight (K, dim). Batch rows run in
// parallel, one OpenMP thread each.
//
// and dropout, y = x keep / (1 - p), keep ~ Bernoulli(1 - p) from a counter-based generator (SplitMix64 of
// seed + index), so any thread can draw any element and a seed drawn from torch's generator makes it reproducible.
//
// Why it is fast: the PyTorch scan makes about four passes over memory per state cell; here each cell is one exp2
// and three multiply-adds on data in L1 or L2 (a row's state is dstate x dim values), and B_t, C_t are read once
// per step. The convolution needs no padded copy, no layout change and no separate activation pass.
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// 2^x for float32, inlined into the vector loops (glibc's vector expf is a call per vector). x = n + f with
// |f| <= 1/2; 2^f from a degree-5 minimax polynomial (relative error below 1.8e-7, about 1.5 float32 ulp), 2^n added
// into the exponent bits. x is clamped to [-126, 127], where 2^n is a normal float: below it the result is 1.2e-38
// instead of a denormal or zero. A NaN x gives a meaningless number: the scan's exponent dt A is NaN only when dt is,
// and then dt u B is too, or when A is, which cpu_kernels.py sends to the PyTorch scan. float64 keeps the library's
// exp2. With AVX-512 the scan's state update uses exp2_16 below instead.
constexpr float EXP2_POLY[] = {1.0f, 6.931469440460205e-1f, 2.4022239446640015e-1f, 5.550793185830116e-2f,
                               9.671630337834358e-3f, 1.324747339822352e-3f};

inline float fast_exp2(float x) {
    const float c = std::min(std::max(x, -126.0f), 127.0f);
    const float n = std::nearbyint(c);
    const float f = c - n;
    float p = EXP2_POLY[5];
    for (int j = 4; j >= 0; --j) p = p * f + EXP2_POLY[j];
    int32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    bits += static_cast<int32_t>(n) << 23;
    std::memcpy(&p, &bits, sizeof p);
    return p;
}
inline double fast_exp2(double x) { return std::exp2(x); }

// NaN tests on the bits: the library is compiled with -ffast-math, under which a floating-point NaN test (x != x,
// std::isnan) would be optimised away.
inline bool is_nan_bits(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7fffffff) > 0x7f800000;
}
inline bool is_nan_bits(double x) {
    int64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7fffffffffffffffLL) > 0x7ff0000000000000LL;
}
inline bool is_finite_bits(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7f800000) != 0x7f800000;
}
inline bool is_finite_bits(double x) {
    int64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7ff0000000000000LL) != 0x7ff0000000000000LL;
}
// x unchanged when it is NaN, else y
inline float keep_nan(float x, float y) { return is_nan_bits(x) ? x : y; }

// log(1 + e) for e in [0, 1], float32, vectorisable: 2 atanh(s) with s = e / (2 + e) in [0, 1/3], an odd series to
// s^11 (truncation below 1e-7 relative; no cancellation for small e, where it is e).
inline float log1p_unit(float e) {
    const float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)); x itself above torch's threshold 20 (and when NaN)
inline float softplus(float x) {
    const float v = std::max(x, 0.0f) + log1p_unit(fast_exp2(std::abs(x) * -1.4426950408889634f));
    return keep_nan(x, x > 20.0f ? x : v);
}
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + fast_exp2(x * T(-1.4426950408889634))); }

template <typename T>
struct Args {
    int64_t batch, seqlen, dim, dstate;
    const T *u, *delta, *A, *B, *C, *D, *z, *bias;  // D, z, bias may be null
    int64_t su, sdelta, sB, sC, sz;                    // row strides of the sequence inputs
    int softplus_on;
    const T* A2;  // A log2(e): exp(dt A) = 2^(dt A2)
};

// dt_t = softplus(delta_t + bias) (each optional) into out, (dim,)
template <typename T>
inline void step_size(const Args<T>& a, const T* delta_t, T* out) {
#pragma omp simd
    for (int64_t d = 0; d < a.dim; ++d) {
        T v = delta_t[d] + (a.bias ? a.bias[d] : T(0));
        out[d] = a.softplus_on ? softplus(v) : v;
    }
}

// One recurrence step for one batch row: h_out <- exp(dt A) h_in + dt u B_t (h_out may be h_in); writes exp(dt A)
// into dA when given and C_t . h_out into y when given (both when both are).
template <typename T>
inline void advance(const Args<T>& a, const T* dt, const T* dtu, const T* B_t, const T* C_t, const T* h_in, T* h_out,
                    T* dA, T* y) {
    const int64_t dim = a.dim;
    if (y) std::fill(y, y + dim, T(0));
    for (int64_t k = 0; k < a.dstate; ++k) {
        const T b = B_t[k];
        const T* A2k = a.A2 + k * dim;
        const T* hi = h_in + k * dim;
        T* ho = h_out + k * dim;
        if (dA) {
            T* dAk = dA + k * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) {
                dAk[d] = fast_exp2(dt[d] * A2k[d]);
                ho[d] = dAk[d] * hi[d] + dtu[d] * b;
            }
            if (y) {
                const T c = C_t[k];
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) y[d] += ho[d] * c;
            }
        } else if (y) {
            const T c = C_t[k];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) {
                ho[d] = fast_exp2(dt[d] * A2k[d]) * hi[d] + dtu[d] * b;
                y[d] += ho[d] * c;
            }
        } else {
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) ho[d] = fast_exp2(dt[d] * A2k[d]) * hi[d] + dtu[d] * b;
        }
    }
}

#ifdef __AVX512F__
// 2^x on 16 lanes: the polynomial of fast_exp2, scaled by 2^n with vscalefps, which is right for every x (no clamp):
// it overflows to inf, underflows through the denormals to 0 and propagates NaN. About a quarter fewer instructions
// per state cell than the auto-vectorised fast_exp2, whose clamps and exponent-bit arithmetic it replaces.
inline __m512 exp2_16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(EXP2_POLY[5]);
    for (int j = 4; j >= 0; --j) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[j]));
    return _mm512_scalef_ps(p, n);
}

// advance for float32 with AVX-512: the same arithmetic, dim in blocks of 16 lanes, each block through all dstate rows
// of the state, so its dt, dt u and C.h stay in registers. What is stored is fixed at compile time (no branch in the
// loop); full blocks use plain loads and stores, the last partial block masked ones (a masked store costs several
// times a plain one on AMD Zen 4).
template <bool kStoreDA, bool kOutputY, bool kMasked>
inline void advance_block(const Args<float>& a, int64_t d, __mmask16 m, const float* dt, const float* dtu,
                          const float* B_t, const float* C_t, const float* h_in, float* h_out, float* dA, float* y) {
    const auto load = [m](const float* p) { return kMasked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p); };
    const auto store = [m](float* p, __m512 v) {
        if (kMasked) _mm512_mask_storeu_ps(p, m, v);
        else _mm512_storeu_ps(p, v);
    };
    const int64_t dim = a.dim;
    const __m512 dt_v = load(dt + d), dtu_v = load(dtu + d);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < a.dstate; ++k) {
        const int64_t o = k * dim + d;
        const __m512 e = exp2_16(_mm512_mul_ps(dt_v, load(a.A2 + o)));
        const __m512 h = _mm512_fmadd_ps(e, load(h_in + o), _mm512_mul_ps(dtu_v, _mm512_set1_ps(B_t[k])));
        store(h_out + o, h);
        if (kStoreDA) store(dA + o, e);
        if (kOutputY) acc = _mm512_fmadd_ps(h, _mm512_set1_ps(C_t[k]), acc);
    }
    if (kOutputY) store(y + d, acc);
}

template <bool kStoreDA, bool kOutputY>
inline void advance_avx512(const Args<float>& a, const float* dt, const float* dtu, const float* B_t, const float* C_t,
                           const float* h_in, float* h_out, float* dA, float* y) {
    const int64_t full = a.dim / 16 * 16;
    for (int64_t d = 0; d < full; d += 16)
        advance_block<kStoreDA, kOutputY, false>(a, d, 0xffff, dt, dtu, B_t, C_t, h_in, h_out, dA, y);
    if (full < a.dim)
        advance_block<kStoreDA, kOutputY, true>(a, full, __mmask16((1u << (a.dim - full)) - 1), dt, dtu, B_t, C_t,
                                                h_in, h_out, dA, y);
}

template <>
inline void advance<float>(const Args<float>& a, const float* dt, const float* dtu, const float* B_t,
                           const float* C_t, const float* h_in, float* h_out, float* dA, float* y) {
    if (dA && y)
        advance_avx512<true, true>(a, dt, dtu, B_t, C_t, h_in, h_out, dA, y);
    else if (dA)
        advance_avx512<true, false>(a, dt, dtu, B_t, C_t, h_in, h_out, dA, y);
    else if (y)
        advance_avx512<false, true>(a, dt, dtu, B_t, C_t, h_in, h_out, dA, y);
    else
        advance_avx512<false, false>(a, dt, dtu, B_t, C_t, h_in, h_out, dA, y);
}
#endif

// h (dstate, dim) advanced through np steps with no outputs: dts, dtus (np, dim) the steps' dt and dt u, Bs (np rows of
// dstate at stride ldb). The state-only scans' update.
template <typename T>
inline void advance_steps(const Args<T>& a, int64_t np, const T* dts, const T* dtus, const T* Bs, int64_t ldb, T* h) {
    for (int64_t s = 0; s < np; ++s)
        advance(a, dts + s * a.dim, dtus + s * a.dim, Bs + s * ldb, (const T*)nullptr, h, h, (T*)nullptr, (T*)nullptr);
}

template <typename T>
inline T silu(T x) { return x * sigmoid(x); }

// Forward over whole rows. Writes out (batch, seqlen, dim) and, when hsave is given, the state entering every chunk
// of `chunk` steps: hsave (batch, ceil(seqlen / chunk), dstate, dim).
template <typename T>
void forward(const Args<T>& a, T* out, T* hsave, int64_t chunk, int threads) {
    const int64_t L = a.seqlen, dim = a.dim, n = a.dstate, nchunks = (L + chunk - 1) / chunk;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> h(n * dim), dt(dim), dtu(dim);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < a.batch; ++i) {
            std::fill(h.begin(), h.end(), T(0));
            for (int64_t t = 0; t < L; ++t) {
                const int64_t row = i * L + t;
                if (hsave && t % chunk == 0)
                    std::memcpy(hsave + (i * nchunks + t / chunk) * n * dim, h.data(), n * dim * sizeof(T));
                const T* u_t = a.u + row * a.su;
                step_size(a, a.delta + row * a.sdelta, dt.data());
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) dtu[d] = dt[d] * u_t[d];
                T* y = out + row * dim;
                advance(a, dt.data(), dtu.data(), a.B + row * a.sB, a.C + row * a.sC, h.data(), h.data(), (T*)nullptr, y);
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) {
                    T v = y[d] + (a.D ? a.D[d] * u_t[d] : T(0));
                    y[d] = a.z ? v * silu(a.z[row * a.sz + d]) : v;
                }
            }
        }
    }
}

// The state after step index[i] of each row i, without outputs: out (batch, dim, dstate), Mamba's layout.
template <typename T>
void state(const Args<T>& a, const int64_t* index, T* out, int threads) {
    const int64_t L = a.seqlen, dim = a.dim, n = a.dstate;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> h(n * dim), dt(dim), dtu(dim);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < a.batch; ++i) {
            std::fill(h.begin(), h.end(), T(0));
            for (int64_t t = 0; t <= index[i]; ++t) {
                const int64_t row = i * L + t;
                step_size(a, a.delta + row * a.sdelta, dt.data());
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) dtu[d] = dt[d] * a.u[row * a.su + d];
                advance(a, dt.data(), dtu.data(), a.B + row * a.sB, (const T*)nullptr, h.data(), h.data(), (T*)nullptr,
                        (T*)nullptr);
            }
            for (int64_t d = 0; d < dim; ++d)
                for (int64_t k = 0; k < n; ++k) out[(i * dim + d) * n + k] = h[k * dim + d];
        }
    }
}

// One step of the backward through the state, for one batch row: with G = dL/dh_{t+1} flowing back (in: from the
// later steps; out: into h_{t-1}) and gy the gradient of C.h at t, writes gC, gB (dstate) and g_dtu, g_dt (dim) of
// step t and adds the step's share to gA (dstate, dim). partials: scratch (used by the AVX-512 version).
template <typename T>
inline void back_step(const Args<T>& a, const T* gy, const T* dt, const T* dtu, const T* B_t, const T* C_t, const T* h,
                      const T* h_prev, const T* dA, T* G, T* gA, T* gC, T* gB, T* g_dtu, T* g_dt, T*) {
    const int64_t dim = a.dim;
    std::fill(g_dtu, g_dtu + dim, T(0));
    std::fill(g_dt, g_dt + dim, T(0));
    for (int64_t k = 0; k < a.dstate; ++k) {
        const T bk = B_t[k], ck = C_t[k];
        T* Gk = G + k * dim;
        const T* hk = h + k * dim;
        const T* hpk = h_prev + k * dim;
        const T* dAk = dA + k * dim;
        const T* Ak = a.A + k * dim;
        T* gAk = gA + k * dim;
        T sC = 0, sB = 0;
#pragma omp simd reduction(+ : sC, sB)
        for (int64_t d = 0; d < dim; ++d) {
            sC += gy[d] * hk[d];
            const T g = Gk[d] + gy[d] * ck;  // dL/dh_t
            sB += g * dtu[d];
            g_dtu[d] += g * bk;
            const T w = g * hpk[d] * dAk[d];  // d/d(dt A) of exp(dt A) h_{t-1}
            g_dt[d] += w * Ak[d];
            gAk[d] += w * dt[d];
            Gk[d] = g * dAk[d];  // what flows into h_{t-1}
        }
        gC[k] = sC;
        gB[k] = sB;
    }
}

#ifdef __AVX512F__
// back_step for float32 with AVX-512, each block of 16 channels through all dstate rows: its gy, dt, dt u and the
// sums over k of g_dtu and g_dt stay in registers (the loop above loads and stores the two sums for every k); the
// sums over channels of gC and gB are kept as 16-lane partials per k and reduced once per step.
template <bool kMasked>
inline void back_block(const Args<float>& a, int64_t d, __mmask16 m, const float* gy, const float* dt,
                       const float* dtu, const float* B_t, const float* C_t, const float* h, const float* h_prev,
                       const float* dA, float* G, float* gA, float* g_dtu, float* g_dt, float* pC, float* pB) {
    const auto load = [m](const float* p) { return kMasked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p); };
    const auto store = [m](float* p, __m512 v) {
        if (kMasked) _mm512_mask_storeu_ps(p, m, v);
        else _mm512_storeu_ps(p, v);
    };
    const int64_t dim = a.dim;
    const __m512 gy_v = load(gy + d), dt_v = load(dt + d), dtu_v = load(dtu + d);  // zeros in masked-off lanes
    __m512 s_dtu = _mm512_setzero_ps(), s_dt = _mm512_setzero_ps();
    for (int64_t k = 0; k < a.dstate; ++k) {
        const int64_t o = k * dim + d;
        const __m512 dAk = load(dA + o);
        _mm512_storeu_ps(pC + 16 * k, _mm512_fmadd_ps(gy_v, load(h + o), _mm512_loadu_ps(pC + 16 * k)));
        const __m512 g = _mm512_fmadd_ps(gy_v, _mm512_set1_ps(C_t[k]), load(G + o));  // dL/dh_t
        _mm512_storeu_ps(pB + 16 * k, _mm512_fmadd_ps(g, dtu_v, _mm512_loadu_ps(pB + 16 * k)));
        s_dtu = _mm512_fmadd_ps(g, _mm512_set1_ps(B_t[k]), s_dtu);
        const __m512 w = _mm512_mul_ps(_mm512_mul_ps(g, load(h_prev + o)), dAk);  // d/d(dt A) of exp(dt A) h_{t-1}
        s_dt = _mm512_fmadd_ps(w, load(a.A + o), s_dt);
        store(gA + o, _mm512_fmadd_ps(w, dt_v, load(gA + o)));
        store(G + o, _mm512_mul_ps(g, dAk));  // what flows into h_{t-1}
    }
    store(g_dtu + d, s_dtu);
    store(g_dt + d, s_dt);
}

template <>
inline void back_step<float>(const Args<float>& a, const float* gy, const float* dt, const float* dtu,
                             const float* B_t, const float* C_t, const float* h, const float* h_prev, const float* dA,
                             float* G, float* gA, float* gC, float* gB, float* g_dtu, float* g_dt, float* partials) {
    const int64_t dim = a.dim, n = a.dstate, full = dim / 16 * 16;
    float* pC = partials;
    float* pB = partials + 16 * n;
    std::fill(partials, partials + 32 * n, 0.0f);
    for (int64_t d = 0; d < full; d += 16)
        back_block<false>(a, d, 0xffff, gy, dt, dtu, B_t, C_t, h, h_prev, dA, G, gA, g_dtu, g_dt, pC, pB);
    if (full < dim)
        back_block<true>(a, full, __mmask16((1u << (dim - full)) - 1), gy, dt, dtu, B_t, C_t, h, h_prev, dA, G, gA,
                         g_dtu, g_dt, pC, pB);
    for (int64_t k = 0; k < n; ++k) {
        gC[k] = _mm512_reduce_add_ps(_mm512_loadu_ps(pC + 16 * k));
        gB[k] = _mm512_reduce_add_ps(_mm512_loadu_ps(pB + 16 * k));
    }
}
#endif

// Gradients of sum(gout . out). Each chunk's states are recomputed from hsave, then the chunk is walked backwards
// with G = dL/dh_t:  G_t = gy_t C_t + exp(dt_{t+1} A) G_{t+1},  where gy = gout silu(z) is the gradient of C.h + D u.
// Writes g_u, g_delta, g_z (when z), gB, gC; gA (dstate, dim), gD, g_bias (dim) are summed over the batch.
template <typename T>
void backward(const Args<T>& a, const T* hsave, int64_t chunk, const T* gout, T* g_u, T* g_delta, T* g_z, T* gB,
              T* gC, T* gA, T* gD, T* g_bias, int threads) {
    const int64_t L = a.seqlen, dim = a.dim, n = a.dstate, nchunks = (L + chunk - 1) / chunk;
    const int nt = std::max(1, std::min<int>(threads, (int)a.batch));
    std::vector<T> accA(nt * n * dim, T(0)), accD(nt * dim, T(0)), accBias(nt * dim, T(0));
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        T* myA = accA.data() + tid * n * dim;
        T* myD = accD.data() + tid * dim;
        T* myBias = accBias.data() + tid * dim;
        std::vector<T> zeros(a.D && a.bias ? 0 : dim, T(0));
        const T* D = a.D ? a.D : zeros.data();
        const T* bias = a.bias ? a.bias : zeros.data();
        std::vector<T> hs((chunk + 1) * n * dim), dAs(chunk * n * dim), G(n * dim), dts(chunk * dim),
            dtus(chunk * dim), ys(a.z ? chunk * dim : 0), gy(dim), g_dtu(dim), g_dt(dim), partials(2 * 16 * n);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < a.batch; ++i) {
            std::fill(G.begin(), G.end(), T(0));
            for (int64_t c = nchunks - 1; c >= 0; --c) {
                const int64_t t0 = c * chunk, t1 = std::min(L, t0 + chunk);
                // hs[0] = h_{t0-1}, hs[1 + s] = h_{t0+s}; dAs[s] = exp(dt_{t0+s} A)
                std::memcpy(hs.data(), hsave + (i * nchunks + c) * n * dim, n * dim * sizeof(T));
                for (int64_t t = t0; t < t1; ++t) {
                    const int64_t s = t - t0, row = i * L + t;
                    T* dt = dts.data() + s * dim;
                    T* dtu = dtus.data() + s * dim;
                    step_size(a, a.delta + row * a.sdelta, dt);
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) dtu[d] = dt[d] * a.u[row * a.su + d];
                    // C.h too when the gate's gradient will need it
                    advance(a, dt, dtu, a.B + row * a.sB, a.C + row * a.sC, hs.data() + s * n * dim,
                            hs.data() + (s + 1) * n * dim, dAs.data() + s * n * dim,
                            a.z ? ys.data() + s * dim : (T*)nullptr);
                }
                for (int64_t t = t1 - 1; t >= t0; --t) {
                    const int64_t s = t - t0, row = i * L + t;
                    const T* dt = dts.data() + s * dim;
                    const T* dtu = dtus.data() + s * dim;
                    const T* h = hs.data() + (s + 1) * n * dim;
                    const T* h_prev = hs.data() + s * n * dim;
                    const T* dA = dAs.data() + s * n * dim;
                    const T* u_t = a.u + row * a.su;
                    const T* B_t = a.B + row * a.sB;
                    const T* C_t = a.C + row * a.sC;
                    const T* go = gout + row * dim;
                    // gy: the gradient of C.h + D u; the gate's gradient needs C.h itself (y, from the recompute)
                    if (a.z) {
                        const T* y = ys.data() + s * dim;
#pragma omp simd
                        for (int64_t d = 0; d < dim; ++d) {
                            const T zv = a.z[row * a.sz + d], sg = sigmoid(zv);
                            const T pre = y[d] + (a.D ? a.D[d] * u_t[d] : T(0));
                            g_z[row * dim + d] = go[d] * pre * sg * (T(1) + zv * (T(1) - sg));
                            gy[d] = go[d] * zv * sg;
                        }
                    } else {
                        std::copy(go, go + dim, gy.begin());
                    }
                    back_step(a, gy.data(), dt, dtu, B_t, C_t, h, h_prev, dA, G.data(), myA, gC + row * n,
                              gB + row * n, g_dtu.data(), g_dt.data(), partials.data());
                    // no conditional stores in the loop, which would keep it from being vectorised: a missing D
                    // or bias reads zeros (myD is then summed and dropped)
                    const T* delta_t = a.delta + row * a.sdelta;
                    const T on = a.softplus_on ? T(1) : T(0);
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) {
                        g_u[row * dim + d] = g_dtu[d] * dt[d] + gy[d] * D[d];
                        myD[d] += gy[d] * u_t[d];
                        const T gd = g_dt[d] + g_dtu[d] * u_t[d];  // dL/d dt; softplus'(x) = sigmoid(x)
                        const T g_delta_d = gd * (on * sigmoid(delta_t[d] + bias[d]) + (T(1) - on));
                        g_delta[row * dim + d] = g_delta_d;
                        myBias[d] += g_delta_d;
                    }
                }
            }
        }
    }
    for (int t = 0; t < nt; ++t) {
        for (int64_t j = 0; j < n * dim; ++j) gA[j] += accA[t * n * dim + j];
        for (int64_t d = 0; d < dim; ++d) {
            if (gD) gD[d] += accD[t * dim + d];
            if (g_bias) g_bias[d] += accBias[t * dim + d];
        }
    }
}

// pre = bias + sum_j w_j x_{t-K+1+j}: the causal depthwise convolution at step t of row i, before its SiLU.
template <typename T>
inline void conv_pre(const T* x, int64_t sx, const T* w, const T* bias, int64_t K, int64_t L, int64_t dim,
                     int64_t i, int64_t t, T* pre) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) pre[d] = bias ? bias[d] : T(0);
    for (int64_t j = std::max<int64_t>(0, K - 1 - t); j < K; ++j) {
        const T* xr = x + (i * L + t - K + 1 + j) * sx;
        const T* wj = w + j * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) pre[d] += wj[d] * xr[d];
    }
}

// y = silu(conv(x)): x (batch, L, dim) with row stride sx, w (K, dim), bias (dim) or null; y contiguous.
template <typename T>
void conv_forward(int64_t batch, int64_t L, int64_t dim, int64_t K, const T* x, int64_t sx, const T* w,
                  const T* bias, T* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < batch; ++i) {
        for (int64_t t = 0; t < L; ++t) {
            T* yt = y + (i * L + t) * dim;
            conv_pre(x, sx, w, bias, K, L, dim, i, t, yt);
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) yt[d] = silu(yt[d]);
        }
    }
}

// Gradients of sum(gy . y): gx contiguous; gw (K, dim) and gbias (dim, or null) summed over the batch.
template <typename T>
void conv_backward(int64_t batch, int64_t L, int64_t dim, int64_t K, const T* x, int64_t sx, const T* w,
                   const T* bias, const T* gy, T* gx, T* gw, T* gbias, int threads) {
    const int nt = std::max(1, std::min<int>(threads, (int)batch));
    std::vector<T> accW(nt * K * dim, T(0)), accB(nt * dim, T(0));
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        T* myW = accW.data() + tid * K * dim;
        T* myB = accB.data() + tid * dim;
        std::vector<T> gpre(L * dim), pre(dim);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch; ++i) {
            for (int64_t t = 0; t < L; ++t) {  // gpre = gy silu'(pre), silu'(p) = s (1 + p (1 - s)), s = sigmoid(p)
                conv_pre(x, sx, w, bias, K, L, dim, i, t, pre.data());
                const T* g = gy + (i * L + t) * dim;
                T* gp = gpre.data() + t * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) {
                    const T sg = sigmoid(pre[d]);
                    gp[d] = g[d] * sg * (T(1) + pre[d] * (T(1) - sg));
                    myB[d] += gp[d];
                }
                for (int64_t j = std::max<int64_t>(0, K - 1 - t); j < K; ++j) {
                    const T* xr = x + (i * L + t - K + 1 + j) * sx;
                    T* gwj = myW + j * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) gwj[d] += gp[d] * xr[d];
                }
            }
            for (int64_t s = 0; s < L; ++s) {  // x_s feeds y_{s+K-1-j} through w_j
                T* gxs = gx + (i * L + s) * dim;
                std::fill(gxs, gxs + dim, T(0));
                for (int64_t j = std::max<int64_t>(0, s + K - L); j < K; ++j) {
                    const T* gp = gpre.data() + (s + K - 1 - j) * dim;
                    const T* wj = w + j * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) gxs[d] += wj[d] * gp[d];
                }
            }
        }
    }
    for (int t = 0; t < nt; ++t) {
        for (int64_t j = 0; j < K * dim; ++j) gw[j] += accW[t * K * dim + j];
        if (gbias)
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) gbias[d] += accB[t * dim + d];
    }
}

// SplitMix64's output function: a 64-bit bijective hash, each output bit depending on every input bit.
inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// Element j keeps when its 32-bit draw is >= threshold (= p 2^32): probability 1 - p. The hash of seed + q gives the
// draws of elements 2q (low half) and 2q + 1 (high half). Writes keep (0 or 1) and y = x keep scale. Hashing and
// selecting run as two loops over a block, each vectorised on its own lane width.
template <typename T>
void dropout_forward(uint64_t seed, int64_t size, uint32_t threshold, T scale, const T* x, T* y, uint8_t* keep,
                     int threads) {
    constexpr int64_t block = 2048;  // elements per block (even)
#pragma omp parallel num_threads(threads)
    {
        uint64_t hashes[block / 2];
        uint32_t draws[block];
#pragma omp for schedule(static)
        for (int64_t start = 0; start < size; start += block) {
            const int64_t n = std::min(block, size - start);
            const uint64_t first = static_cast<uint64_t>(start / 2);
#pragma omp simd
            for (int64_t q = 0; q < (n + 1) / 2; ++q) hashes[q] = splitmix64(seed + (first + q) * 0x9e3779b97f4a7c15ULL);
            std::memcpy(draws, hashes, sizeof hashes);  // little-endian: draws[2q] = low half, draws[2q + 1] = high
            const T* xs = x + start;
            T* ys = y + start;
            uint8_t* ks = keep + start;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const bool k = draws[j] >= threshold;
                ks[j] = k;
                ys[j] = xs[j] * (k ? scale : T(0));
            }
        }
    }
}

// The arguments, with A log2(e) computed into a2 (which must outlive them). strides: the row strides of u, delta,
// B, C, z.
template <typename T>
Args<T> args(int64_t batch, int64_t seqlen, int64_t dim, int64_t dstate, const void* u, const void* delta,
             const void* A, const void* B, const void* C, const void* D, const void* z, const void* bias,
             const int64_t* strides, int softplus_on, std::vector<T>& a2) {
    a2.resize(dim * dstate);
    for (int64_t j = 0; j < dim * dstate; ++j) a2[j] = ((const T*)A)[j] * T(1.4426950408889634);
    return Args<T>{batch,       seqlen,      dim,         dstate,      (const T*)u,    (const T*)delta,
                   (const T*)A, (const T*)B, (const T*)C, (const T*)D, (const T*)z,    (const T*)bias,
                   strides[0],  strides[1],  strides[2],  strides[3],  strides[4],     softplus_on,
                   a2.data()};
}

// out[p][0:m] = init[0:m] (zeros when null) + sum_{j<k} x[p][j] W[j ldw + 0:m] for rows p < np of x (row stride
// ldx) and out (row stride ldo): a few vectors times a matrix whose rows are contiguous, the matrix products of
// mamba_last.
template <typename T>
inline void rows_mat(const T* x, int64_t ldx, int64_t np, int64_t k, const T* W, int64_t ldw, int64_t m, const T* init,
                     T* out, int64_t ldo) {
    for (int64_t p = 0; p < np; ++p) {
        T* o = out + p * ldo;
#pragma omp simd
        for (int64_t r = 0; r < m; ++r) o[r] = init ? init[r] : T(0);
        for (int64_t j = 0; j < k; ++j) {
            const T c = x[p * ldx + j];
            const T* w = W + j * ldw;
#pragma omp simd
            for (int64_t r = 0; r < m; ++r) o[r] += c * w[r];
        }
    }
}

#ifdef __AVX512F__
// float32 with AVX-512: blocks of R <= 4 rows x 64 outputs summed in 4R registers across all k (R fixed at compile
// time, so they stay registers), each weight vector loaded once per block and out written once; the loop above
// reloads and stores out for every j.
template <int R>
inline void rows_block(const float* x, int64_t ldx, int64_t k, const float* W, int64_t ldw, const __mmask16* mask,
                       const __m512* start, float* out, int64_t ldo) {
    __m512 acc[R][4];
    for (int q = 0; q < R; ++q)
        for (int b = 0; b < 4; ++b) acc[q][b] = start[b];
    for (int64_t j = 0; j < k; ++j) {
        __m512 wv[4];
        for (int b = 0; b < 4; ++b) wv[b] = _mm512_maskz_loadu_ps(mask[b], W + j * ldw + 16 * b);
        for (int q = 0; q < R; ++q) {
            const __m512 c = _mm512_set1_ps(x[q * ldx + j]);
            for (int b = 0; b < 4; ++b) acc[q][b] = _mm512_fmadd_ps(c, wv[b], acc[q][b]);
        }
    }
    for (int q = 0; q < R; ++q)
        for (int b = 0; b < 4; ++b)
            if (mask[b] == 0xffff) _mm512_storeu_ps(out + q * ldo + 16 * b, acc[q][b]);
            else if (mask[b]) _mm512_mask_storeu_ps(out + q * ldo + 16 * b, mask[b], acc[q][b]);
}

template <>
inline void rows_mat<float>(const float* x, int64_t ldx, int64_t np, int64_t k, const float* W, int64_t ldw,
                            int64_t m, const float* init, float* out, int64_t ldo) {
    for (int64_t r0 = 0; r0 < m; r0 += 64) {
        __mmask16 mask[4];
        __m512 start[4];
        for (int b = 0; b < 4; ++b) {
            const int64_t left = m - r0 - 16 * b;
            mask[b] = left >= 16 ? __mmask16(0xffff) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
            start[b] = init ? _mm512_maskz_loadu_ps(mask[b], init + r0 + 16 * b) : _mm512_setzero_ps();
        }
        int64_t p = 0;
        for (; p + 4 <= np; p += 4)
            rows_block<4>(x + p * ldx, ldx, k, W + r0, ldw, mask, start, out + p * ldo + r0, ldo);
        switch (np - p) {
            case 3: rows_block<3>(x + p * ldx, ldx, k, W + r0, ldw, mask, start, out + p * ldo + r0, ldo); break;
            case 2: rows_block<2>(x + p * ldx, ldx, k, W + r0, ldw, mask, start, out + p * ldo + r0, ldo); break;
            case 1: rows_block<1>(x + p * ldx, ldx, k, W + r0, ldw, mask, start, out + p * ldo + r0, ldo); break;
        }
    }
}
#endif

// Mamba.forward_last up to out_proj, fused: for each row i, steps 0 .. index[i] of the block on its inputs
// hidden (batch, seqlen, d_model) (row strides sb, st; last dimension contiguous), and the output at index[i]:
//     x_t = W_x h_t + b_x                 in_proj's x half
//     u_t = silu(conv(x)_t)               the causal depthwise conv
//     [dr_t, B_t] = W_dB u_t              x_proj's rank-R step-size and B rows
//     dt_t = softplus(W_dt dr_t + bias)   dt_proj
//     h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t
//     y = (C . h + D u) silu(z)           at t = index[i] only, with C = W_C u there and z given
// Weights in the layouts the loops read with unit stride: w_x (d_model, dim) = in_proj's x rows transposed, w_xproj
// (dim, R + 2N) = x_proj transposed, w_dt (R, dim) = dt_proj transposed, conv_w (K, dim), A2 (N, dim) = A log2(e)
// transposed; b_x, conv_b, D optional. The products run on chunks of P steps (register-blocked, rows_mat), then the
// chunk's state updates. Why: as separate ops (matmuls, conv, scan) at evaluation sizes each pays its dispatch, and
// writes and rereads a (batch, seqlen, ·) tensor; here nothing of that size is written, the steps after a row's
// index (its padding) are not run, and the block is one call (at batch 1 and 8 steps, 266 us against 422 us for
// Mamba4Rec's whole forward_last; at B=32, L=200 Mamba.forward_last takes 7.6 ms against 8.5 ms, one thread).
template <typename T>
void mamba_last(const Args<T>& a, int64_t d_model, int64_t rank, int64_t K, const T* hidden, int64_t sb, int64_t st,
                const T* w_x, const T* b_x, const T* conv_w, const T* conv_b, const T* w_xproj, const T* w_dt,
                const int64_t* index, T* y, int threads) {
    const int64_t dim = a.dim, n = a.dstate, width = rank + 2 * n;
    constexpr int64_t P = 16;  // steps whose projections run together (the weights are read once per chunk)
#pragma omp parallel num_threads(threads)
    {
        // xs: the conv's inputs, its K-1 previous ones (zeros before step 0) then the chunk's; us, vs: the chunk's
        // conv outputs and x_proj outputs
        std::vector<T> h(n * dim), xs((K - 1 + P) * dim), us(P * dim), vs(P * width), dts(P * dim), dtus(P * dim);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < a.batch; ++i) {
            std::fill(h.begin(), h.end(), T(0));
            std::fill(xs.begin(), xs.end(), T(0));
            const int64_t steps = index[i] + 1;
            for (int64_t t0 = 0; t0 < steps; t0 += P) {
                const int64_t np = std::min(P, steps - t0);
                T* x = xs.data() + (K - 1) * dim;  // x[s] = in_proj's x at step t0 + s; x[-K+1 .. -1] before it
                rows_mat(hidden + i * sb + t0 * st, st, np, d_model, w_x, dim, dim, b_x, x, dim);
                for (int64_t s = 0; s < np; ++s) {
                    T* u = us.data() + s * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) u[d] = conv_b ? conv_b[d] : T(0);
                    for (int64_t j = 0; j < K; ++j) {  // tap j meets x_{t-K+1+j}
                        const T* xr = x + (s - K + 1 + j) * dim;
                        const T* w = conv_w + j * dim;
#pragma omp simd
                        for (int64_t d = 0; d < dim; ++d) u[d] += w[d] * xr[d];
                    }
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) u[d] = silu(u[d]);
                }
                // C only at the row's last step, the one whose output is read
                const bool ends = t0 + np == steps;
                rows_mat(us.data(), dim, np, dim, w_xproj, width, rank + n, (const T*)nullptr, vs.data(), width);
                if (ends)
                    rows_mat(us.data() + (np - 1) * dim, dim, 1, dim, w_xproj + rank + n, width, n, (const T*)nullptr,
                             vs.data() + (np - 1) * width + rank + n, width);
                rows_mat(vs.data(), width, np, rank, w_dt, dim, dim, a.bias, dts.data(), dim);
                for (int64_t s = 0; s < np; ++s) {
                    T* dt = dts.data() + s * dim;
                    T* dtu = dtus.data() + s * dim;
                    const T* u = us.data() + s * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) {
                        dt[d] = softplus(dt[d]);
                        dtu[d] = dt[d] * u[d];
                    }
                }
                advance_steps(a, np, dts.data(), dtus.data(), vs.data() + rank, width, h.data());
                // the last K-1 conv inputs move to the front for the next chunk
                std::memmove(xs.data(), xs.data() + np * dim, (K - 1) * dim * sizeof(T));
                if (!ends) continue;
                const T* u = us.data() + (np - 1) * dim;
                const T* C = vs.data() + (np - 1) * width + rank + n;
                T* yi = y + i * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) yi[d] = a.D ? a.D[d] * u[d] : T(0);
                for (int64_t k = 0; k < n; ++k) {
                    const T c = C[k];
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) yi[d] += h[k * dim + d] * c;
                }
                if (a.z) {
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) yi[d] *= silu(a.z[i * dim + d]);
                }
            }
        }
    }
}

// y[i] = sum_{s <= t} k[t - s] h[i, s] at t = index[i]: the causal long convolution (the Fourier filter's) at one step
// per row. h (batch, seqlen, d) with row strides sb, st; k (>= seqlen, d) contiguous.
template <typename T>
void causal_filter_last(int64_t batch, int64_t d, const T* h, int64_t sb, int64_t st, const T* k, const int64_t* index,
                        T* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < batch; ++i) {
        T* yi = y + i * d;
        std::fill(yi, yi + d, T(0));
        const int64_t t = index[i];
        for (int64_t s = 0; s <= t; ++s) {
            const T* hs = h + i * sb + s * st;
            const T* kt = k + (t - s) * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) yi[c] += kt[c] * hs[c];
        }
    }
}

// The causal long convolution along time of x (batch, L, d) with a kernel k (L, d), channel-wise, and its gradients:
//     y[t] = sum_{j <= t} k[j] x[t-j]
//     gx[s] = sum_{t >= s} k[t-s] gy[t],  gk[j] = sum_{b, t >= j} gy[b, t] x[b, t-j]
// directly, in O(L^2 d) per row: at the lengths of sequential recommendation (tens to a few hundred steps) fewer
// operations than the FFTs' passes, copies and complex arithmetic. Everything contiguous; gk summed over the batch
// (per-thread partials). Each is a sum over pairs (p, q) of out[p] += a[p - q or q - p] * b[q]; the three loops share
// one shape: R consecutive outputs at a time (`corr_rows`), summed in registers with AVX-512.
//
// out[p0 + r] (r < R) += sum over the pairs that run through all R rows at once, then the partial ones:
//     causal (y):      out[p] = sum_{q <= p} a[p - q] b[q]     (a = k, b = x)
//     anti (gx):       out[p] = sum_{q >= p} a[q - p] b[q]     (a = k, b = gy)
//     lag (gk):        out[p] = sum_{q >= p} a[q] b[q - p]     (a = gy, b = x)
enum class Pairs { causal, anti, lag };

template <typename T, Pairs kind>
inline void corr_generic(int64_t L, int64_t d, const T* a, const T* b, T* out) {
    for (int64_t p = 0; p < L; ++p) {
        T* o = out + p * d;
        const int64_t lo = kind == Pairs::causal ? 0 : p, hi = kind == Pairs::causal ? p + 1 : L;
        for (int64_t q = lo; q < hi; ++q) {
            const T* av = a + (kind == Pairs::causal ? p - q : kind == Pairs::anti ? q - p : q) * d;
            const T* bv = b + (kind == Pairs::lag ? q - p : q) * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) o[c] += av[c] * bv[c];
        }
    }
}


#ifdef __AVX512F__
template <Pairs kind, int R>
inline void corr_rows(int64_t L, int64_t d, int64_t c, __mmask16 m, int64_t p0, const float* a, const float* b,
                      float* out) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_maskz_loadu_ps(m, out + (p0 + r) * d + c);
    const auto term = [&](int r, int64_t q) {  // pair (p0 + r, q)
        const int64_t p = p0 + r;
        const int64_t ia = kind == Pairs::causal ? p - q : kind == Pairs::anti ? q - p : q;
        const int64_t ib = kind == Pairs::lag ? q - p : q;
        acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + ia * d + c), _mm512_maskz_loadu_ps(m, b + ib * d + c),
                                 acc[r]);
    };
    if (kind == Pairs::causal) {  // q <= p: q < p0 reaches every row, q = p0 .. p0+R-2 the later ones
        for (int64_t q = 0; q < p0; ++q)
            for (int r = 0; r < R; ++r) term(r, q);
        for (int64_t q = p0; q < p0 + R; ++q)
            for (int r = int(q - p0); r < R; ++r) term(r, q);
    } else {  // q >= p: q >= p0 + R - 1 reaches every row, q = p0 .. p0+R-2 the earlier ones
        for (int64_t q = p0; q < p0 + R - 1; ++q)
            for (int r = 0; r <= int(q - p0); ++r) term(r, q);
        for (int64_t q = p0 + R - 1; q < L; ++q)
            for (int r = 0; r < R; ++r) term(r, q);
    }
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (p0 + r) * d + c, m, acc[r]);
}

template <Pairs kind>
inline void corr_avx512(int64_t L, int64_t d, const float* a, const float* b, float* out) {
    for (int64_t c = 0; c < d; c += 16) {
        const __mmask16 m = d - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - c)) - 1);
        int64_t p = 0;
        for (; p + 4 <= L; p += 4) corr_rows<kind, 4>(L, d, c, m, p, a, b, out);
        for (; p < L; ++p) corr_rows<kind, 1>(L, d, c, m, p, a, b, out);
    }
}

#endif

template <typename T, Pairs kind>
inline void corr(int64_t L, int64_t d, const T* a, const T* b, T* out) {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<T, float>) return corr_avx512<kind>(L, d, a, b, out);
#endif
    corr_generic<T, kind>(L, d, a, b, out);
}

template <typename T>
void long_conv_forward(int64_t batch, int64_t L, int64_t d, const T* x, const T* k, T* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < batch; ++i) {
        std::fill(y + i * L * d, y + (i + 1) * L * d, T(0));
        corr<T, Pairs::causal>(L, d, k, x + i * L * d, y + i * L * d);
    }
}

template <typename T>
void long_conv_backward(int64_t batch, int64_t L, int64_t d, const T* x, const T* k, const T* gy, T* gx, T* gk,
                        int threads) {
    const int nt = std::max(1, std::min<int>(threads, (int)batch));
    std::vector<T> acc(gk ? nt * L * d : 0, T(0));
#pragma omp parallel num_threads(nt)
    {
        T* mine = gk ? acc.data() + omp_get_thread_num() * L * d : nullptr;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch; ++i) {
            if (gx) {
                std::fill(gx + i * L * d, gx + (i + 1) * L * d, T(0));
                corr<T, Pairs::anti>(L, d, k, gy + i * L * d, gx + i * L * d);
            }
            if (gk) corr<T, Pairs::lag>(L, d, gy + i * L * d, x + i * L * d, mine);
        }
    }
    if (gk) {
        std::fill(gk, gk + L * d, T(0));
        for (int t = 0; t < nt; ++t)
            for (int64_t j = 0; j < L * d; ++j) gk[j] += acc[t * L * d + j];
    }
}

// The softmax stream gate (models/gate.py) at P positions, n streams s_i (P, d) each, W (n, n d), b (n):
//     alpha[p] = softmax(W [s_1[p]; ...; s_n[p]] + b),   out[p] = sum_i alpha_i[p] s_i[p]
// and its backward, with g = dL/dout and ga_i = g . s_i:
//     dlogit = alpha (ga - alpha . ga),   ds_i = alpha_i g + dlogit W[:, i d : (i+1) d],
//     dW = sum_p dlogit s^T,   db = sum_p dlogit
// per position in one pass, where autograd runs a concatenation, two matmuls, a softmax and n multiply-adds, and as
// many backward ops, each over the whole (P, n d) tensor. dW and db are summed per thread, then added.
template <typename T>
void gate_forward(int64_t P, int64_t n, int64_t d, const T* const* s, const T* W, const T* b, T* out, T* alpha,
                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < P; ++p) {
        T* a = alpha + p * n;
        for (int64_t i = 0; i < n; ++i) {
            T z = b[i];
            for (int64_t j = 0; j < n; ++j) {
                const T* w = W + i * n * d + j * d;
                const T* sj = s[j] + p * d;
#pragma omp simd reduction(+ : z)
                for (int64_t c = 0; c < d; ++c) z += w[c] * sj[c];
            }
            a[i] = z;
        }
        const T top = *std::max_element(a, a + n);  // (no -inf start: -ffast-math assumes finite values)
        T total = 0;
        for (int64_t i = 0; i < n; ++i) total += a[i] = std::exp(a[i] - top);
        for (int64_t i = 0; i < n; ++i) a[i] /= total;
        T* o = out + p * d;
        std::fill(o, o + d, T(0));
        for (int64_t i = 0; i < n; ++i) {
            const T ai = a[i];
            const T* si = s[i] + p * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) o[c] += ai * si[c];
        }
    }
}

template <typename T>
void gate_backward(int64_t P, int64_t n, int64_t d, const T* const* s, const T* W, const T* alpha, const T* gout,
                   T* const* gs, T* gW, T* gb, int threads) {
    const int nt = std::max(1, std::min<int>(threads, (int)std::max<int64_t>(P, 1)));
    std::vector<T> accW(nt * n * n * d, T(0)), accb(nt * n, T(0));
#pragma omp parallel num_threads(nt)
    {
        T* myW = accW.data() + omp_get_thread_num() * n * n * d;
        T* myb = accb.data() + omp_get_thread_num() * n;
        std::vector<T> ga(n), dl(n);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; ++p) {
            const T* a = alpha + p * n;
            const T* g = gout + p * d;
            T mean = 0;
            for (int64_t i = 0; i < n; ++i) {
                const T* si = s[i] + p * d;
                T dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int64_t c = 0; c < d; ++c) dot += g[c] * si[c];
                ga[i] = dot;
                mean += a[i] * dot;
            }
            for (int64_t i = 0; i < n; ++i) {
                dl[i] = a[i] * (ga[i] - mean);
                myb[i] += dl[i];
            }
            for (int64_t j = 0; j < n; ++j) {  // stream j: its own weight, and the logits it feeds
                T* gj = gs[j] + p * d;
                const T* sj = s[j] + p * d;
                const T aj = a[j];
#pragma omp simd
                for (int64_t c = 0; c < d; ++c) gj[c] = aj * g[c];
                for (int64_t i = 0; i < n; ++i) {
                    const T di = dl[i];
                    const T* w = W + i * n * d + j * d;
                    T* gw = myW + i * n * d + j * d;
#pragma omp simd
                    for (int64_t c = 0; c < d; ++c) {
                        gj[c] += di * w[c];
                        gw[c] += di * sj[c];
                    }
                }
            }
        }
    }
    std::fill(gW, gW + n * n * d, T(0));
    std::fill(gb, gb + n, T(0));
    for (int t = 0; t < nt; ++t) {
        for (int64_t j = 0; j < n * n * d; ++j) gW[j] += accW[t * n * n * d + j];
        for (int64_t i = 0; i < n; ++i) gb[i] += accb[t * n + i];
    }
}

// Cross-entropy over one chunk of C logits per row, the passes of chunked_softmax.py after each chunk's matmul, one row
// at a time in one pass where the tensor ops made four or five over the (M, C) chunk, with the inlined exp:
//   forward:  the chunk's max c and sum exp(z - c) merged into the running (max, sum) of logsumexp; the target's
//             logit picked up where it lies in the chunk (local index t >= 0); the sum of the logits (label smoothing)
//   backward: z <- scale (exp(z - lse) - eps / N - (1 - eps) [j = t]), the logits' gradient, in place
template <typename T>
inline T exp_neg(T x) { return fast_exp2(x * T(1.4426950408889634)); }  // x <= 0: 2^(x log2 e) within the clamps

// sum of x[0:n] in W lanes, then reduced (a reduction clause's loop ran scalar here)
template <typename T>
inline T lane_sum(const T* x, int64_t n) {
    constexpr int W = 16;
    T acc[W] = {};
    const int64_t body = n / W * W;
    for (int64_t j = 0; j < body; j += W)
#pragma omp simd
        for (int q = 0; q < W; ++q) acc[q] += x[j + q];
    T total = 0;
    for (int q = 0; q < W; ++q) total += acc[q];
    for (int64_t j = body; j < n; ++j) total += x[j];
    return total;
}

template <typename T>
inline T lane_max(const T* x, int64_t n) {
    constexpr int W = 16;
    T acc[W];
    std::fill(acc, acc + W, x[0]);
    const int64_t body = n / W * W;
    for (int64_t j = 0; j < body; j += W)
#pragma omp simd
        for (int q = 0; q < W; ++q) acc[q] = std::max(acc[q], x[j + q]);
    T top = *std::max_element(acc, acc + W);
    for (int64_t j = body; j < n; ++j) top = std::max(top, x[j]);
    return top;
}

// (z is scratch: the forward overwrites it with exp(z - max))
template <typename T>
void ce_chunk_forward(int64_t M, int64_t C, T* z, const int64_t* target, T* run_max, T* run_sum, T* target_logit,
                      T* logit_sum, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < M; ++r) {
        T* zr = z + r * C;
        const T all = lane_sum(zr, C);
        // a NaN or infinite logit in this chunk or an earlier one: the loss is NaN, as the tensor ops make it (the max
        // and the clamped exp below would hide it); the check is on the bits (-ffast-math assumes finite values)
        if (!is_finite_bits(all) || !is_finite_bits(run_sum[r])) {
            run_max[r] = run_sum[r] = std::numeric_limits<T>::quiet_NaN();
            continue;
        }
        if (target[r] >= 0) target_logit[r] = zr[target[r]];
        if (logit_sum) logit_sum[r] += all;
        const T top = lane_max(zr, C);
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) zr[j] = exp_neg(zr[j] - top);
        const T total = lane_sum(zr, C);
        const T m = std::max(run_max[r], top);
        // (the first chunk's running max is -inf; its running sum 0 then adds nothing, and exp_neg is never given it)
        run_sum[r] = (run_sum[r] > 0 ? run_sum[r] * exp_neg(run_max[r] - m) : T(0)) + total * exp_neg(top - m);
        run_max[r] = m;
    }
}

template <typename T>
void ce_chunk_backward(int64_t M, int64_t C, T* z, const int64_t* target, const T* lse, T eps_over_n, T target_term,
                       T scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < M; ++r) {
        T* zr = z + r * C;
        const T l = lse[r];
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) zr[j] = scale * (exp_neg(zr[j] - l) - eps_over_n);
        if (target[r] >= 0) zr[target[r]] += scale * target_term;
    }
}

}  // namespace

// The C entry points: `is_double` picks float64, else float32; pointers may be null where the argument is optional;
// `strides` holds the row strides of u, delta, B, C, z (z's is read only when z is given).
extern "C" {

void scan_forward(int is_double, int64_t batch, int64_t seqlen, int64_t dim, int64_t dstate, const void* u,
                  const void* delta, const void* A, const void* B, const void* C, const void* D, const void* z,
                  const void* bias, const int64_t* strides, int softplus_on, void* out, void* hsave, int64_t chunk,
                  int threads) {
    std::vector<double> a2d;
    std::vector<float> a2f;
    if (is_double)
        forward(args<double>(batch, seqlen, dim, dstate, u, delta, A, B, C, D, z, bias, strides, softplus_on, a2d),
                (double*)out, (double*)hsave, chunk, threads);
    else
        forward(args<float>(batch, seqlen, dim, dstate, u, delta, A, B, C, D, z, bias, strides, softplus_on, a2f),
                (float*)out, (float*)hsave, chunk, threads);
}

// Checks its inputs first (cheaper here than as tensor ops and host syncs in Python) and returns 1 when an index lies
// outside [0, seqlen), 2 when A holds a NaN (the caller then uses the PyTorch scan), else 0 once out is written.
int scan_state(int is_double, int64_t batch, int64_t seqlen, int64_t dim, int64_t dstate, const void* u,
               const void* delta, const void* A, const void* B, const void* bias, const int64_t* strides,
               int softplus_on, const int64_t* index, void* out, int threads) {
    for (int64_t i = 0; i < batch; ++i)
        if (index[i] < 0 || index[i] >= seqlen) return 1;
    for (int64_t j = 0; j < dim * dstate; ++j) {
        const bool nan = is_double ? is_nan_bits(((const double*)A)[j]) : is_nan_bits(((const float*)A)[j]);
        if (nan) return 2;
    }
    std::vector<double> a2d;
    std::vector<float> a2f;
    if (is_double)
        state(args<double>(batch, seqlen, dim, dstate, u, delta, A, B, nullptr, nullptr, nullptr, bias, strides,
                           softplus_on, a2d),
              index, (double*)out, threads);
    else
        state(args<float>(batch, seqlen, dim, dstate, u, delta, A, B, nullptr, nullptr, nullptr, bias, strides,
                          softplus_on, a2f),
              index, (float*)out, threads);
    return 0;
}

void scan_backward(int is_double, int64_t batch, int64_t seqlen, int64_t dim, int64_t dstate, const void* u,
                   const void* delta, const void* A, const void* B, const void* C, const void* D, const void* z,
                   const void* bias, const int64_t* strides, int softplus_on, const void* hsave, int64_t chunk,
                   const void* gout, void* g_u,
                   void* g_delta, void* g_z, void* gB, void* gC, void* gA, void* gD, void* g_bias, int threads) {
    std::vector<double> a2d;
    std::vector<float> a2f;
    if (is_double)
        backward(args<double>(batch, seqlen, dim, dstate, u, delta, A, B, C, D, z, bias, strides, softplus_on, a2d),
                 (const double*)hsave, chunk, (const double*)gout, (double*)g_u, (double*)g_delta, (double*)g_z,
                 (double*)gB, (double*)gC, (double*)gA, (double*)gD, (double*)g_bias, threads);
    else
        backward(args<float>(batch, seqlen, dim, dstate, u, delta, A, B, C, D, z, bias, strides, softplus_on, a2f),
                 (const float*)hsave, chunk, (const float*)gout, (float*)g_u, (float*)g_delta, (float*)g_z,
                 (float*)gB, (float*)gC, (float*)gA, (float*)gD, (float*)g_bias, threads);
}

void conv_forward(int is_double, int64_t batch, int64_t seqlen, int64_t dim, int64_t width, const void* x,
                  int64_t x_stride, const void* w, const void* bias, void* y, int threads) {
    if (is_double)
        conv_forward(batch, seqlen, dim, width, (const double*)x, x_stride, (const double*)w, (const double*)bias,
                     (double*)y, threads);
    else
        conv_forward(batch, seqlen, dim, width, (const float*)x, x_stride, (const float*)w, (const float*)bias,
                     (float*)y, threads);
}

void conv_backward(int is_double, int64_t batch, int64_t seqlen, int64_t dim, int64_t width, const void* x,
                   int64_t x_stride, const void* w, const void* bias, const void* gy, void* gx, void* gw, void* gbias,
                   int threads) {
    if (is_double)
        conv_backward(batch, seqlen, dim, width, (const double*)x, x_stride, (const double*)w, (const double*)bias,
                      (const double*)gy, (double*)gx, (double*)gw, (double*)gbias, threads);
    else
        conv_backward(batch, seqlen, dim, width, (const float*)x, x_stride, (const float*)w, (const float*)bias,
                      (const float*)gy, (float*)gx, (float*)gw, (float*)gbias, threads);
}

void dropout_forward(int is_double, uint64_t seed, int64_t size, uint32_t threshold, double scale, const void* x,
                     void* y, void* keep, int threads) {
    if (is_double)
        dropout_forward(seed, size, threshold, scale, (const double*)x, (double*)y, (uint8_t*)keep, threads);
    else
        dropout_forward(seed, size, threshold, (float)scale, (const float*)x, (float*)y, (uint8_t*)keep, threads);
}

// Mamba.forward_last before out_proj (see mamba_last above): y (batch, dim). A (dim, N) as Mamba holds it (the other
// weights already in the kernel's layouts); z (batch, dim) and D, b_x, conv_b optional; delta_bias required. Returns 1
// when an index lies outside [0, seqlen), 2 when A holds a NaN (nothing written then), else 0.
int mamba_last(int is_double, int64_t batch, int64_t seqlen, int64_t d_model, int64_t dim, int64_t dstate,
               int64_t rank, int64_t conv_width, const void* hidden, int64_t sb, int64_t st, const void* w_x,
               const void* b_x, const void* conv_w, const void* conv_b, const void* w_xproj, const void* w_dt,
               const void* delta_bias, const void* A, const void* D, const void* z, const int64_t* index, void* y,
               int threads) {
    for (int64_t i = 0; i < batch; ++i)
        if (index[i] < 0 || index[i] >= seqlen) return 1;
    for (int64_t j = 0; j < dim * dstate; ++j) {
        const bool nan = is_double ? is_nan_bits(((const double*)A)[j]) : is_nan_bits(((const float*)A)[j]);
        if (nan) return 2;
    }
    const auto run = [&](auto zero) {
        using T = decltype(zero);
        std::vector<T> a2(dim * dstate);  // (N, dim): A log2(e), transposed
        for (int64_t d = 0; d < dim; ++d)
            for (int64_t k = 0; k < dstate; ++k)
                a2[k * dim + d] = ((const T*)A)[d * dstate + k] * T(1.4426950408889634);
        Args<T> a{};
        a.batch = batch;
        a.seqlen = seqlen;
        a.dim = dim;
        a.dstate = dstate;
        a.D = (const T*)D;
        a.z = (const T*)z;
        a.bias = (const T*)delta_bias;
        a.softplus_on = 1;
        a.A2 = a2.data();
        mamba_last(a, d_model, rank, conv_width, (const T*)hidden, sb, st, (const T*)w_x, (const T*)b_x,
                   (const T*)conv_w, (const T*)conv_b, (const T*)w_xproj, (const T*)w_dt, index, (T*)y, threads);
    };
    if (is_double)
        run(0.0);
    else
        run(0.0f);
    return 0;
}

void causal_filter_last(int is_double, int64_t batch, int64_t seqlen, int64_t d, const void* h, int64_t sb, int64_t st,
                        const void* k, const int64_t* index, void* y, int threads) {
    if (is_double)
        causal_filter_last(batch, d, (const double*)h, sb, st, (const double*)k, index, (double*)y, threads);
    else
        causal_filter_last(batch, d, (const float*)h, sb, st, (const float*)k, index, (float*)y, threads);
}

void long_conv_forward(int is_double, int64_t batch, int64_t L, int64_t d, const void* x, const void* k, void* y,
                       int threads) {
    if (is_double)
        long_conv_forward(batch, L, d, (const double*)x, (const double*)k, (double*)y, threads);
    else
        long_conv_forward(batch, L, d, (const float*)x, (const float*)k, (float*)y, threads);
}

void long_conv_backward(int is_double, int64_t batch, int64_t L, int64_t d, const void* x, const void* k,
                        const void* gy, void* gx, void* gk, int threads) {
    if (is_double)
        long_conv_backward(batch, L, d, (const double*)x, (const double*)k, (const double*)gy, (double*)gx,
                           (double*)gk, threads);
    else
        long_conv_backward(batch, L, d, (const float*)x, (const float*)k, (const float*)gy, (float*)gx, (float*)gk,
                           threads);
}

void gate_forward(int is_double, int64_t P, int64_t n, int64_t d, const void* const* s, const void* W, const void* b,
                  void* out, void* alpha, int threads) {
    if (is_double)
        gate_forward(P, n, d, (const double* const*)s, (const double*)W, (const double*)b, (double*)out,
                     (double*)alpha, threads);
    else
        gate_forward(P, n, d, (const float* const*)s, (const float*)W, (const float*)b, (float*)out, (float*)alpha,
                     threads);
}

void gate_backward(int is_double, int64_t P, int64_t n, int64_t d, const void* const* s, const void* W,
                   const void* alpha, const void* gout, void* const* gs, void* gW, void* gb, int threads) {
    if (is_double)
        gate_backward(P, n, d, (const double* const*)s, (const double*)W, (const double*)alpha, (const double*)gout,
                      (double* const*)gs, (double*)gW, (double*)gb, threads);
    else
        gate_backward(P, n, d, (const float* const*)s, (const float*)W, (const float*)alpha, (const float*)gout,
                      (float* const*)gs, (float*)gW, (float*)gb, threads);
}
}

// ---------------------------------------------------------------------------------------------------------------------
// Serving steps: one more input per row, at the small batches of a server, where each PyTorch op's dispatch costs more
// than its arithmetic. References: `step_stacked` (ops/mamba.py) for mamba_step and M2RecBlock.step (models/m2rec.py)
// for m2rec_block_step. Every matrix is stored (in, out), row-major, so a matrix-vector product adds rows of it into
// an output that stays in L1, vectorised along the output. Batch rows (and the stacked Mambas of mamba_step) run in
// parallel, one OpenMP thread each.

namespace {

// S Mambas of the same sizes, weights stacked in dim 0 (StepWeights in ops/mamba.py); conv_bias, out_bias may be null.
struct MambaStep {
    int64_t stack, d_model, inner, dstate, width;
    const void *conv_weight, *conv_bias;  // (S, E·D, width), (S, E·D)
    const void* x_proj;                   // (S, E·D, E·D + 2N): x -> [Δ before its bias, B, C]
    const void *dt_bias, *A, *D;          // (S, E·D), (S, E·D, N), (S, E·D)
    const void *out_proj, *out_bias;      // (S, E·D, d_model), (S, d_model)
};

// One M2Rec block (M2RecBlock in models/m2rec.py): its multi-scale Mamba, Fourier filter, gate, skip and FFN.
struct BlockStep {
    MambaStep mamba;
    const void *in_proj, *in_bias;  // (d, S·2·E·D) every scale's in_proj divided by its window length s, bias or null
    const int64_t* scales;          // (S,) window lengths
    const void* mix;                // (S,) scale weights, null with one scale
    int64_t taps;                   // Fourier kernel taps = history length; 0 without the Fourier stream
    const void* kernel;             // (taps, d)
    int64_t streams;                // streams into the gate: temporal, then Fourier and semantic where present
    int gate;                       // 0: one stream, no gate; 1: their sum; 2: softmax weights
    const void *gate_weight, *gate_bias;  // (streams·d, streams), (streams,)
    int residual;                         // 0: none; 1: h + mixed; 2: the sigmoid skip gate
    const void *skip_weight, *skip_bias;  // (2d, d), (d,)
    const void *norm_weight, *norm_bias;  // (d,)
    double norm_eps;
    int64_t ffn_inner;
    const void *w1, *b1, *w2, *b2;                // (d, inner), (inner,), (inner, d), (d,)
    const void *ffn_norm_weight, *ffn_norm_bias;  // (d,)
    double ffn_norm_eps;
};

// y = b + x W: x (in,), W (in, out), b (out,) or null. Four rows of W per pass over y: a quarter of the loads and
// stores of y, and of the store-to-load waits on it when it is short.
template <typename T>
inline void linear(const T* x, const T* W, const T* b, int64_t in, int64_t out, T* y) {
    if (b)
        std::copy(b, b + out, y);
    else
        std::fill(y, y + out, T(0));
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
        const T x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
        const T *W0 = W + i * out, *W1 = W0 + out, *W2 = W1 + out, *W3 = W2 + out;
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) y[o] += x0 * W0[o] + x1 * W1[o] + x2 * W2[o] + x3 * W3[o];
    }
    for (; i < in; ++i) {
        const T xi = x[i];
        const T* Wi = W + i * out;
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) y[o] += xi * Wi[o];
    }
}

// y[j] = sum_t a[t, j] b[t, j] over rows t < rows of width d, four rows per pass over y (as in linear)
template <typename T>
inline void column_dots(const T* a, const T* b, int64_t rows, int64_t d, T* y) {
    std::fill(y, y + d, T(0));
    int64_t t = 0;
    for (; t + 4 <= rows; t += 4) {
        const T *a0 = a + t * d, *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
        const T *b0 = b + t * d, *b1 = b0 + d, *b2 = b1 + d, *b3 = b2 + d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) y[j] += a0[j] * b0[j] + a1[j] * b1[j] + a2[j] * b2[j] + a3[j] * b3[j];
    }
    for (; t < rows; ++t)
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) y[j] += a[t * d + j] * b[t * d + j];
}

template <typename T>
inline void layer_norm(const T* x, const T* weight, const T* bias, T eps, int64_t d, T* y) {
    T mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
    for (int64_t j = 0; j < d; ++j) mean += x[j];
    mean /= T(d);
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < d; ++j) var += (x[j] - mean) * (x[j] - mean);
    const T inv = T(1) / std::sqrt(var / T(d) + eps);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) y[j] = (x[j] - mean) * inv * weight[j] + bias[j];
}

template <typename T>
inline T gelu(T x) { return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752))); }

// Values of scratch memory mamba_row needs.
inline int64_t mamba_scratch(const MambaStep& w) { return 3 * w.inner + 2 * w.dstate; }

// One step of Mamba s of the stack on one row: conv (E·D, width-1) and ssm (E·D, N) its state, xz (2·E·D) in_proj of
// the input, step 1 or 0 (0: Δ = 0, which leaves the scan state as it was). Writes window (E·D, width), the conv's
// inputs t-width+1 .. t; ssm_out (E·D, N); y (d_model). The activations (SiLU, softplus) run in loops of their own
// over the channels, vectorised, not per channel beside a loop over the state.
template <typename T>
void mamba_row(const MambaStep& w, int64_t s, const T* conv, const T* ssm, const T* xz, T step, T* window, T* ssm_out,
               T* y, T* scratch) {
    const int64_t E = w.inner, N = w.dstate, K = w.width, R = E + 2 * N;
    const T* conv_w = (const T*)w.conv_weight + s * E * K;
    const T* conv_b = w.conv_bias ? (const T*)w.conv_bias + s * E : nullptr;
    const T* dt_bias = (const T*)w.dt_bias + s * E;
    const T* A = (const T*)w.A + s * E * N;
    const T* D = (const T*)w.D + s * E;
    T *u = scratch, *dtbc = u + E, *gated = dtbc + R;
    for (int64_t c = 0; c < E; ++c) {  // the depthwise conv at t alone
        T* win = window + c * K;
        std::copy(conv + c * (K - 1), conv + (c + 1) * (K - 1), win);
        win[K - 1] = xz[c];
        T acc = conv_b ? conv_b[c] : T(0);
        for (int64_t j = 0; j < K; ++j) acc += conv_w[c * K + j] * win[j];
        u[c] = acc;
    }
#pragma omp simd
    for (int64_t c = 0; c < E; ++c) u[c] = silu(u[c]);
    linear(u, (const T*)w.x_proj + s * E * R, (const T*)nullptr, E, R, dtbc);
    T* dt = dtbc;  // Δ in place of its pre-activation
#pragma omp simd
    for (int64_t c = 0; c < E; ++c) {
        dt[c] = softplus(dtbc[c] + dt_bias[c]) * step;
        gated[c] = silu(xz[E + c]);
    }
    const T *B = dtbc + E, *C = B + N;
    for (int64_t c = 0; c < E; ++c) {  // h = exp(Δ A) h + Δ x B;  y = (C . h + D x) silu(z)
        const T dt2 = dt[c] * T(1.4426950408889634), dtu = dt[c] * u[c];
        const T* Ac = A + c * N;
        const T* hc = ssm + c * N;
        T* out = ssm_out + c * N;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < N; ++k) {
            const T h = fast_exp2(dt2 * Ac[k]) * hc[k] + dtu * B[k];
            out[k] = h;
            acc += h * C[k];
        }
        gated[c] *= acc + D[c] * u[c];
    }
    linear(gated, (const T*)w.out_proj + s * E * w.d_model, w.out_bias ? (const T*)w.out_bias + s * w.d_model : nullptr,
           E, w.d_model, y);
}

// step_stacked on batch x S (row, Mamba) pairs: conv (B, S, E·D, width-1), ssm (B, S, E·D, N), xz (B, S, 2·E·D),
// steps (B, S) or null (all 1) -> window (B, S, E·D, width), ssm_out (B, S, E·D, N), y (B, S, d_model).
template <typename T>
void mamba_step_rows(const MambaStep& w, int64_t batch, const T* conv, const T* ssm, const T* xz, const T* steps,
                     T* window, T* ssm_out, T* y, int threads) {
    const int64_t S = w.stack, E = w.inner, N = w.dstate, K = w.width;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> scratch(mamba_scratch(w));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < batch * S; ++r)
            mamba_row(w, r % S, conv + r * E * (K - 1), ssm + r * E * N, xz + r * 2 * E, steps ? steps[r] : T(1),
                      window + r * E * K, ssm_out + r * E * N, y + r * w.d_model, scratch.data());
    }
}

// The state of one row, as MultiScaleState and M2RecBlockState hold it (models/state.py).
template <typename T>
struct RowState {
    T* window_sum;         // (S, 2·E·D)
    int64_t* window_count;  // (S,)
    T *conv, *ssm, *output, *fourier;  // (S, E·D, width-1), (S, E·D, N), (S, d), (taps, d)
};

// M2RecBlock.step on one row: h (d) the block's input, semantic (d) or null, state `in` -> state `out`, y (d).
template <typename T>
void block_row(const BlockStep& w, const T* h, const T* semantic, const RowState<T>& in, const RowState<T>& out, T* y,
               T* scratch) {
    const MambaStep& m = w.mamba;
    const int64_t S = m.stack, d = m.d_model, E = m.inner, N = m.dstate, K = m.width, F = w.ffn_inner;
    T *mean = scratch, *window = mean + S * 2 * E, *mamba_tmp = window + E * K, *streams = mamba_tmp + mamba_scratch(m);
    T *both = streams + w.streams * d, *x = both + 2 * d, *inner = x + d, *logits = inner + F;

    // multi-scale Mamba: each open window's sum of in_proj / s gains the input; a complete one is its Mamba's input
    linear(h, (const T*)w.in_proj, (const T*)w.in_bias, d, S * 2 * E, mean);
    for (int64_t s = 0; s < S; ++s) {
        T* ms = mean + s * 2 * E;
        const T* sum = in.window_sum + s * 2 * E;
#pragma omp simd
        for (int64_t j = 0; j < 2 * E; ++j) ms[j] += sum[j];
        const int64_t count = in.window_count[s] + 1;
        T* conv_out = out.conv + s * E * (K - 1);
        if (count == w.scales[s]) {
            mamba_row(m, s, in.conv + s * E * (K - 1), in.ssm + s * E * N, ms, T(1), window, out.ssm + s * E * N,
                      out.output + s * d, mamba_tmp);
            for (int64_t c = 0; c < E; ++c) std::copy(window + c * K + 1, window + (c + 1) * K, conv_out + c * (K - 1));
            std::fill(out.window_sum + s * 2 * E, out.window_sum + (s + 1) * 2 * E, T(0));
            out.window_count[s] = 0;
        } else {  // the scale repeats its last output; its Mamba state waits for the window
            std::copy(ms, ms + 2 * E, out.window_sum + s * 2 * E);
            out.window_count[s] = count;
            std::copy(in.conv + s * E * (K - 1), in.conv + (s + 1) * E * (K - 1), conv_out);
            std::copy(in.ssm + s * E * N, in.ssm + (s + 1) * E * N, out.ssm + s * E * N);
            std::copy(in.output + s * d, in.output + (s + 1) * d, out.output + s * d);
        }
    }
    const T* mix = (const T*)w.mix;
    for (int64_t j = 0; j < d; ++j) streams[j] = mix ? mix[0] * out.output[j] : out.output[j];
    for (int64_t s = 1; s < S; ++s)
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) streams[j] += mix[s] * out.output[s * d + j];
    int64_t n = 1;

    // Fourier filter: the history (newest first) shifts by one input, one copy of its contiguous rows, then
    // y = sum_j k[j] h[t-j]
    if (w.taps) {
        std::copy(h, h + d, out.fourier);
        std::copy(in.fourier, in.fourier + (w.taps - 1) * d, out.fourier + d);
        column_dots((const T*)w.kernel, out.fourier, w.taps, d, streams + n++ * d);
    }
    if (semantic) std::copy(semantic, semantic + d, streams + n++ * d);

    // gate, skip, LayerNorm, FFN
    T* mixed = streams;
    if (w.gate == 1) {
        for (int64_t i = 1; i < n; ++i)
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) mixed[j] += streams[i * d + j];
    } else if (w.gate == 2) {
        linear(streams, (const T*)w.gate_weight, (const T*)w.gate_bias, n * d, n, logits);
        const T top = *std::max_element(logits, logits + n);
        T total = 0;
        for (int64_t i = 0; i < n; ++i) total += logits[i] = std::exp(logits[i] - top);
        mixed = both + d;  // the skip gate reads [h; mixed] as one vector
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) mixed[j] = logits[0] / total * streams[j];
        for (int64_t i = 1; i < n; ++i) {
            const T alpha = logits[i] / total;
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) mixed[j] += alpha * streams[i * d + j];
        }
    }
    if (w.residual == 2) {
        std::copy(h, h + d, both);
        if (mixed != both + d) std::copy(mixed, mixed + d, both + d);
        linear(both, (const T*)w.skip_weight, (const T*)w.skip_bias, 2 * d, d, x);
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
            const T g = sigmoid(x[j]);
            x[j] = g * h[j] + (T(1) - g) * both[d + j];
        }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) x[j] = w.residual ? h[j] + mixed[j] : mixed[j];
    }
    layer_norm(x, (const T*)w.norm_weight, (const T*)w.norm_bias, T(w.norm_eps), d, x);
    linear(x, (const T*)w.w1, (const T*)w.b1, d, F, inner);
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) inner[j] = gelu(inner[j]);
    linear(inner, (const T*)w.w2, (const T*)w.b2, F, d, y);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) y[j] += x[j];
    layer_norm(y, (const T*)w.ffn_norm_weight, (const T*)w.ffn_norm_bias, T(w.ffn_norm_eps), d, y);
}

template <typename T>
void block_step_rows(const BlockStep& w, int64_t batch, const T* h, const T* semantic, RowState<T> in,
                     RowState<T> out, T* y, int threads) {
    const MambaStep& m = w.mamba;
    const int64_t S = m.stack, d = m.d_model, E = m.inner;
    const int64_t sizes[] = {S * 2 * E, S, S * E * (m.width - 1), S * E * m.dstate, S * d, w.taps * d};
#pragma omp parallel num_threads(threads)
    {
        // block_row's: window means, conv window, mamba_row's, streams, [h; mixed], x, FFN inner, gate logits
        std::vector<T> scratch(S * 2 * E + E * m.width + mamba_scratch(m) + (w.streams + 3) * d + w.ffn_inner +
                               w.streams);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch; ++i) {
            auto row = [&](const RowState<T>& st) {
                return RowState<T>{st.window_sum + i * sizes[0], st.window_count + i * sizes[1], st.conv + i * sizes[2],
                                   st.ssm + i * sizes[3], st.output + i * sizes[4],
                                   st.fourier ? st.fourier + i * sizes[5] : nullptr};
            };
            block_row(w, h + i * d, semantic ? semantic + i * d : nullptr, row(in), row(out), y + i * d,
                      scratch.data());
        }
    }
}

template <typename T>
RowState<T> row_state(const void* window_sum, const int64_t* window_count, const void* conv, const void* ssm,
                      const void* output, const void* fourier) {
    return RowState<T>{(T*)window_sum, (int64_t*)window_count, (T*)conv, (T*)ssm, (T*)output, (T*)fourier};
}

}  // namespace

// `is_double` picks float64, else float32; every tensor is contiguous, in that dtype (window_count int64).
extern "C" {

void mamba_step(int is_double, const MambaStep* w, int64_t batch, const void* conv, const void* ssm, const void* xz,
                const void* steps, void* window, void* ssm_out, void* y, int threads) {
    if (is_double)
        mamba_step_rows(*w, batch, (const double*)conv, (const double*)ssm, (const double*)xz, (const double*)steps,
                        (double*)window, (double*)ssm_out, (double*)y, threads);
    else
        mamba_step_rows(*w, batch, (const float*)conv, (const float*)ssm, (const float*)xz, (const float*)steps,
                        (float*)window, (float*)ssm_out, (float*)y, threads);
}

// The state in (window_sum .. fourier, fourier null without the Fourier stream) is read only; the new one is written
// to the *_out tensors, and the block's output to y.
void m2rec_block_step(int is_double, const BlockStep* w, int64_t batch, const void* h, const void* semantic,
                      const void* window_sum, const int64_t* window_count, const void* conv, const void* ssm,
                      const void* output, const void* fourier, void* window_sum_out, int64_t* window_count_out,
                      void* conv_out, void* ssm_out, void* output_out, void* fourier_out, void* y, int threads) {
    if (is_double)
        block_step_rows(*w, batch, (const double*)h, (const double*)semantic,
                        row_state<double>(window_sum, window_count, conv, ssm, output, fourier),
                        row_state<double>(window_sum_out, window_count_out, conv_out, ssm_out, output_out, fourier_out),
                        (double*)y, threads);
    else
        block_step_rows(*w, batch, (const float*)h, (const float*)semantic,
                        row_state<float>(window_sum, window_count, conv, ssm, output, fourier),
                        row_state<float>(window_sum_out, window_count_out, conv_out, ssm_out, output_out, fourier_out),
                        (float*)y, threads);
}

void ce_chunk_forward(int is_double, int64_t M, int64_t C, void* z, const int64_t* target, void* run_max,
                      void* run_sum, void* target_logit, void* logit_sum, int threads) {
    if (is_double)
        ce_chunk_forward(M, C, (double*)z, target, (double*)run_max, (double*)run_sum, (double*)target_logit,
                         (double*)logit_sum, threads);
    else
        ce_chunk_forward(M, C, (float*)z, target, (float*)run_max, (float*)run_sum, (float*)target_logit,
                         (float*)logit_sum, threads);
}

void ce_chunk_backward(int is_double, int64_t M, int64_t C, void* z, const int64_t* target, const void* lse,
                       double eps_over_n, double target_term, double scale, int threads) {
    if (is_double)
        ce_chunk_backward(M, C, (double*)z, target, (const double*)lse, eps_over_n, target_term, scale, threads);
    else
        ce_chunk_backward(M, C, (float*)z, target, (const float*)lse, (float)eps_over_n, (float)target_term,
                          (float)scale, threads);
}
}
