// Quantised LLaMA-family forward for x86-64 CPUs with AVX2, FMA and F16C (see server/engine/kernels/__init__.py).
//
// Weights are held as the GGUF file holds them: Q4_1 groups of 32 values (4-bit codes q, a scale d and a minimum m
// per group: w = d * q + m) for the matrices of the decoder layers, Q8_0 groups (int8 codes and a scale) for the
// tied embedding / output head. Activations are quantised to int8 per group of 32 right before each matrix product
// (a scale per group, and the group's sum for the Q4_1 minimum), so every product is an integer dot product
// (AVX2 maddubs) plus a float scale per group. The KV cache is fp16.
//
// One call (q4_forward) runs every layer of one block of rows: embeddings in, the last column's logits out.
// A row's result depends only on that row's inputs: every reduction runs in a fixed order over one row's data, and
// how rows are split over threads never changes what is computed for a row (batch invariance).
//
// Threads: a pool of its own (not OpenMP, whose teams started from a non-main thread ran 2-3x slower here). The
// caller's thread is worker 0; the others sleep between calls. Within a call, each step's work is shared out in
// chunks and waited for by completion (Chunks), so a preempted thread does not hold the others at a barrier.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int GROUP = 32;

// ---------------------------------------------------------------- thread pool
class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++gen_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }

  void run(const std::function<void(int, int)>& fn) {
    if (n_ == 1) {
      fn(0, 1);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      done_.store(0, std::memory_order_relaxed);
      ++gen_;
    }
    cv_.notify_all();
    fn(0, n_);
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < n_ - 1) pause(spins);
  }

 private:
  static void pause(int& spins) {
    if (++spins < 4000) {
      _mm_pause();
    } else {
      std::this_thread::yield();  // the other core is busy with someone else: let it run
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int, int)>* fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return gen_ != seen; });
        seen = gen_;
        if (stop_) return;
        fn = fn_;
      }
      (*fn)(id, n_);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t gen_ = 0;
  bool stop_ = false;
  const std::function<void(int, int)>* fn_ = nullptr;
  std::atomic<int> done_{0};
};

// One step's work handed out in chunks from a shared counter, and waited for by completion: a thread passes a step
// once every unit of it is done, whoever did it. A thread the OS preempts (the other core busy with a client, say)
// then holds up only a chunk it took, never a barrier it has not reached: the other thread takes the rest of each
// step and goes on (with plain barriers, 2 threads beside a client ran a forward 5x slower than 1 thread).
// Counters: two per step of the call (taken, done), zeroed before it. Which thread computes a row or column never
// changes what is computed for it.
class Chunks {
 public:
  Chunks(std::atomic<int>* counters, int nth) : counters_(counters), nth_(nth) {}
  template <class F>
  void run(int units, F&& f, int per_thread = 4) {
    std::atomic<int>& next = counters_[2 * op_];
    std::atomic<int>& done = counters_[2 * op_ + 1];
    ++op_;
    int chunk = std::max(1, units / (nth_ * per_thread));
    for (;;) {
      int lo = next.fetch_add(chunk, std::memory_order_relaxed);
      if (lo >= units) break;
      int hi = std::min(units, lo + chunk);
      f(lo, hi);
      done.fetch_add(hi - lo, std::memory_order_acq_rel);
    }
    int spins = 0;
    while (done.load(std::memory_order_acquire) < units) {
      if (++spins < 4000) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  std::atomic<int>* counters_;
  int nth_;
  int op_ = 0;
};

// ---------------------------------------------------------------- small vector helpers
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// exp for x in float range, ~1 ulp polynomial (Cephes' expf reduction and coefficients)
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// ---------------------------------------------------------------- int8 activations
// x [K] -> q [K] int8, per group g: scale d[g] (x ~ d * q) and s[g] = d * sum(q) (for the Q4_1 minimum)
inline void quantize_row(const float* x, int K, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int g = 0; g < K / GROUP; ++g) {
    const float* xg = x + g * GROUP;
    __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8), v2 = _mm256_loadu_ps(xg + 16),
           v3 = _mm256_loadu_ps(xg + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float amax = _mm_cvtss_f32(m4);
    float dg = amax / 127.0f;
    __m256 id = _mm256_set1_ps(dg > 0.0f ? 1.0f / dg : 0.0f);
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), rnd));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), rnd));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), rnd));
    int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * GROUP), _mm256_permutevar8x32_epi32(p, perm));
    d[g] = dg;
    s[g] = dg * static_cast<float>(sum);
  }
}

struct Acts {  // quantised activations of M rows of width K
  const int8_t* q;
  const float* d;
  const float* s;
  int K;
};

struct Q4 {  // a Q4_1 matrix [N, K] in blocks of 8 rows (see Q4Packed in server/engine/quant.py):
  // codes [N/8, K/32, 4, 32]: vector j of a (block, group) holds in its low nibbles the 4-value quad 2j of the
  // group for each of the 8 rows (row r at bytes 4r..4r+3) and in its high nibbles quad 2j+1;
  // d, m [N/8, K/32, 8]: the 8 rows' scales and minimums
  const uint8_t* q;
  const float* d;
  const float* m;
  int N, K;
};

// out[m, n0..n0+7] (+)= W[n0..n0+7, :] . x[m, :] for rows m0..m0+MB-1 of x. Per group, each of the 8 quads of
// activation codes is broadcast against the 8 rows' codes (maddubs: u8 codes x s8 activations, pairs summed into
// int16; 8 quads of up to 2*15*127 each still fit int16), then one int32 widening, one float scale per group.
inline __m256i broadcast_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <int MB>
inline void q4_tile(const Q4& W, int blk, const Acts& A, int m0, float* out, int ldo, bool accumulate) {
  const int G = W.K / GROUP;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
  __m256 acc[MB];
  for (int b = 0; b < MB; ++b) acc[b] = _mm256_setzero_ps();
  const uint8_t* codes = W.q + static_cast<size_t>(blk) * G * 128;
  const float* wd = W.d + static_cast<size_t>(blk) * G * 8;
  const float* wm = W.m + static_cast<size_t>(blk) * G * 8;
  alignas(32) __m256i w[8];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < 4; ++j) {
      __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 128 + j * 32));
      w[2 * j] = _mm256_and_si256(p, low);
      w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
    }
    __m256 dv = _mm256_loadu_ps(wd + g * 8), mv = _mm256_loadu_ps(wm + g * 8);
    for (int b = 0; b < MB; ++b) {
      size_t row = static_cast<size_t>(m0 + b);
      const int8_t* x = A.q + row * A.K + g * GROUP;
      __m256i s = _mm256_maddubs_epi16(w[0], broadcast_quad(x));
      for (int j = 1; j < 8; ++j) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[j], broadcast_quad(x + 4 * j)));
      __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones));
      acc[b] = _mm256_fmadd_ps(f, _mm256_mul_ps(dv, _mm256_set1_ps(A.d[row * G + g])), acc[b]);
      acc[b] = _mm256_fmadd_ps(mv, _mm256_set1_ps(A.s[row * G + g]), acc[b]);
    }
  }
  for (int b = 0; b < MB; ++b) {
    float* o = out + static_cast<size_t>(m0 + b) * ldo + blk * 8;
    _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), acc[b]) : acc[b]);
  }
}

// out[M, N] (+)= x[M, K] W^T, in units of (64 rows of x, 8 columns of out) so x stays in cache
void q4_matmul(const Q4& W, const Acts& A, int M, float* out, int ldo, bool acc, Chunks& work) {
  const int nblk = W.N / 8, nmc = (M + 63) / 64;
  work.run(nmc * nblk, [&](int lo, int hi) {
    for (int u = lo; u < hi; ++u) {
      int mc = (u / nblk) * 64, blk = u % nblk, me = std::min(M, mc + 64);
      int m = mc;
      for (; m + 4 <= me; m += 4) q4_tile<4>(W, blk, A, m, out, ldo, acc);
      switch (me - m) {
        case 3: q4_tile<3>(W, blk, A, m, out, ldo, acc); break;
        case 2: q4_tile<2>(W, blk, A, m, out, ldo, acc); break;
        case 1: q4_tile<1>(W, blk, A, m, out, ldo, acc); break;
        default: break;
      }
    }
  });
}

struct Q8 {  // a Q8_0 matrix [N, K] in blocks of 8 rows (see Q8Packed in server/engine/quant.py):
  // codes int8 [N/8, K/32, 8, 32]: vector j of a (block, group) holds quad j of the group for each of the 8 rows
  // (row r at bytes 4r..4r+3); d [N/8, K/32, 8]
  const int8_t* q;
  const float* d;
  int N, K;
};

// as q4_tile, for signed codes: |w| (unsigned) against x carrying w's sign (maddubs takes one unsigned operand);
// pairs of products reach 2*127*127, so each quad is widened to int32 on its own
template <int MB>
inline void q8_tile(const Q8& W, int blk, const Acts& A, int m0, float* out, int ldo) {
  const int G = W.K / GROUP;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MB];
  for (int b = 0; b < MB; ++b) acc[b] = _mm256_setzero_ps();
  const int8_t* codes = W.q + static_cast<size_t>(blk) * G * 256;
  const float* wd = W.d + static_cast<size_t>(blk) * G * 8;
  for (int g = 0; g < G; ++g) {
    const int8_t* x[MB];
    __m256i s[MB];
    for (int b = 0; b < MB; ++b) {
      x[b] = A.q + static_cast<size_t>(m0 + b) * A.K + g * GROUP;
      s[b] = _mm256_setzero_si256();
    }
    for (int j = 0; j < 8; ++j) {
      __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 256 + j * 32));
      __m256i aw = _mm256_sign_epi8(w, w);
      for (int b = 0; b < MB; ++b) {
        __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(broadcast_quad(x[b] + 4 * j), w));
        s[b] = _mm256_add_epi32(s[b], _mm256_madd_epi16(p, ones));
      }
    }
    __m256 dv = _mm256_loadu_ps(wd + g * 8);
    for (int b = 0; b < MB; ++b) {
      size_t row = static_cast<size_t>(m0 + b);
      acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[b]), _mm256_mul_ps(dv, _mm256_set1_ps(A.d[row * G + g])),
                               acc[b]);
    }
  }
  for (int b = 0; b < MB; ++b) _mm256_storeu_ps(out + static_cast<size_t>(m0 + b) * ldo + blk * 8, acc[b]);
}

void q8_matmul(const Q8& W, const Acts& A, int M, float* out, int ldo, Chunks& work) {
  const int nblk = W.N / 8, nmc = (M + 63) / 64;
  work.run(nmc * nblk, [&](int lo, int hi) {
    for (int u = lo; u < hi; ++u) {
      int mc = (u / nblk) * 64, blk = u % nblk, me = std::min(M, mc + 64);
      int m = mc;
      for (; m + 4 <= me; m += 4) q8_tile<4>(W, blk, A, m, out, ldo);
      switch (me - m) {
        case 3: q8_tile<3>(W, blk, A, m, out, ldo); break;
        case 2: q8_tile<2>(W, blk, A, m, out, ldo); break;
        case 1: q8_tile<1>(W, blk, A, m, out, ldo); break;
        default: break;
      }
    }
  });
}

// ---------------------------------------------------------------- row-wise steps
inline void rmsnorm_row(const float* x, const float* w, int K, float eps, float* y) {
  __m256 ss = _mm256_setzero_ps();
  for (int k = 0; k < K; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  float r = 1.0f / std::sqrt(hsum(ss) / static_cast<float>(K) + eps);
  __m256 rv = _mm256_set1_ps(r);
  for (int k = 0; k < K; k += 8)
    _mm256_storeu_ps(y + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), rv), _mm256_loadu_ps(w + k)));
}

struct Layer {
  const float* attn_norm;
  Q4 qkv;  // q, k, v rows stacked: [(heads + 2 kv_heads) * head_dim, hidden]
  Q4 o;
  const float* ffn_norm;
  Q4 gate_up;  // gate rows then up rows: [2 * ffn, hidden]
  Q4 down;
};

struct Scratch {  // grown, never shrunk: reused across calls
  std::vector<int8_t> q;
  std::vector<float> d, s, normed, qkv, attn, ffn, act;
  std::vector<std::vector<float>> scores;
  void fit(size_t rows, size_t hidden, size_t qkv_w, size_t attn_w, size_t ffn_w, size_t kv_len, int threads) {
    size_t width = std::max({hidden, attn_w, ffn_w});
    if (q.size() < rows * width) q.resize(rows * width);
    if (d.size() < rows * width / GROUP) {
      d.resize(rows * width / GROUP);
      s.resize(rows * width / GROUP);
    }
    if (normed.size() < rows * width) normed.resize(rows * width);
    if (qkv.size() < rows * qkv_w) qkv.resize(rows * qkv_w);
    if (attn.size() < rows * attn_w) attn.resize(rows * attn_w);
    if (ffn.size() < rows * 2 * ffn_w) ffn.resize(rows * 2 * ffn_w);
    if (act.size() < rows * ffn_w) act.resize(rows * ffn_w);
    if (static_cast<int>(scores.size()) < threads) scores.resize(threads);
    for (auto& v : scores)
      if (v.size() < kv_len) v.resize(kv_len);
  }
};

std::mutex g_call;  // one forward at a time (the scratch and the pool are shared)
Pool* g_pool = nullptr;
std::vector<std::atomic<int>> g_counters;
Scratch g_scratch;

Pool& pool(int threads) {
  if (g_pool == nullptr || g_pool->size() != threads) {
    delete g_pool;
    g_pool = new Pool(threads);
  }
  return *g_pool;
}

// x [M, K] quantised per group as in the forward
void quantize_all(const float* x, int Mrows, int K, std::vector<int8_t>& q, std::vector<float>& d,
                  std::vector<float>& s) {
  q.resize(static_cast<size_t>(Mrows) * K);
  d.resize(static_cast<size_t>(Mrows) * K / GROUP);
  s.resize(d.size());
  for (int m = 0; m < Mrows; ++m)
    quantize_row(x + static_cast<size_t>(m) * K, K, q.data() + static_cast<size_t>(m) * K,
                 d.data() + static_cast<size_t>(m) * K / GROUP, s.data() + static_cast<size_t>(m) * K / GROUP);
}

}  // namespace

extern "C" {

// The model: per layer 14 pointers (attn_norm; qkv codes, d, m; o codes, d, m; ffn_norm; gate_up codes, d, m;
// down codes, d, m), then the final norm, the head's int8 codes and scales, and the rope tables [max_pos, hd/2].
struct Q4Model {
  int32_t layers, hidden, heads, kv_heads, head_dim, ffn, vocab, max_pos;
  float eps;
  const void* const* layer_ptrs;
  const float* final_norm;
  const int8_t* head_q;
  const float* head_d;
  const float* rope_cos;
  const float* rope_sin;
};

// One forward of n rows of q tokens each.
//   h        [n*q, hidden] fp32: the input embeddings, overwritten (the residual stream)
//   pos      [n*q] int64: rope positions;  write_pos [n*q] int64: cache positions (>= trash: left padding)
//   k, v     fp16 caches [layers, cache_rows, kv_heads, cache_len, head_dim]; rows row_start.. are this block's
//   kv_len   key positions that exist this step (a query at position p attends to 0..p)
//   logits   [n, vocab] fp32: the last column of each row
//   lora_ptrs, lora_meta  (both null: no LoRA row) per (row of the block, layer, module) for the modules q, k, v, o,
//            gate, up, down: the A [r, in] and B [out, r] fp32 pointers (null A: that module is not adapted) and
//            (r, scale); after a module's product its LoRA rows add scale * B (A x), x the module's fp32 input
int q4_forward(const Q4Model* model, float* h, const int64_t* pos, const int64_t* write_pos, int n, int q,
               uint16_t* kcache, uint16_t* vcache, int cache_rows, int cache_len, int row_start, int kv_len,
               float* logits, int threads, const int64_t* lora_ptrs, const float* lora_meta) {
  const Q4Model& M = *model;
  if (M.hidden % GROUP || M.ffn % GROUP || (M.kv_heads * M.head_dim) % 8 || M.vocab % 8 || M.head_dim % 16 || M.head_dim > 256 || M.heads % M.kv_heads || (M.heads * M.head_dim) % GROUP) return 1;
  if (row_start < 0 || row_start + n > cache_rows || kv_len > cache_len || threads < 1) return 2;
  const int T = n * q, H = M.hidden, hd = M.head_dim, half = hd / 2, F = M.ffn;
  const int qw = M.heads * hd, kvw = M.kv_heads * hd, qkv_w = qw + 2 * kvw;
  const int trash = cache_len - 1;
  for (int t = 0; t < T; ++t)
    if (write_pos[t] < 0 || write_pos[t] > trash || (write_pos[t] < trash && write_pos[t] >= kv_len) ||
        pos[t] < 0 || pos[t] >= M.max_pos)
      return 3;

  std::lock_guard<std::mutex> lock(g_call);
  Scratch& S = g_scratch;
  S.fit(T, H, qkv_w, qw, F, kv_len, threads);
  std::vector<Layer> L(M.layers);
  for (int l = 0; l < M.layers; ++l) {
    const void* const* p = M.layer_ptrs + 14 * l;
    auto q4 = [&](int i, int N, int K) {
      return Q4{static_cast<const uint8_t*>(p[i]), static_cast<const float*>(p[i + 1]),
                static_cast<const float*>(p[i + 2]), N, K};
    };
    L[l] = Layer{static_cast<const float*>(p[0]), q4(1, qkv_w, H), q4(4, H, qw), static_cast<const float*>(p[7]),
                 q4(8, 2 * F, H), q4(11, H, F)};
  }
  const size_t l_stride = static_cast<size_t>(cache_rows) * M.kv_heads * cache_len * hd;
  const size_t r_stride = static_cast<size_t>(M.kv_heads) * cache_len * hd;
  const size_t h_stride = static_cast<size_t>(cache_len) * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int group = M.heads / M.kv_heads;
  Pool& P = pool(threads);

  auto quantize_rows = [&](const float* x, int K, Chunks& work) {
    work.run(T, [&](int lo, int hi) {
      for (int t = lo; t < hi; ++t)
        quantize_row(x + static_cast<size_t>(t) * K, K, S.q.data() + static_cast<size_t>(t) * K,
                     S.d.data() + static_cast<size_t>(t) * K / GROUP, S.s.data() + static_cast<size_t>(t) * K / GROUP);
    });
  };
  auto norm_rows = [&](const float* w, Chunks& work) {
    work.run(T, [&](int lo, int hi) {
    for (int t = lo; t < hi; ++t) {
      float* y = S.normed.data() + static_cast<size_t>(t) * H;
      rmsnorm_row(h + static_cast<size_t>(t) * H, w, H, M.eps, y);
      quantize_row(y, H, S.q.data() + static_cast<size_t>(t) * H, S.d.data() + static_cast<size_t>(t) * H / GROUP,
                   S.s.data() + static_cast<size_t>(t) * H / GROUP);
    }
    });
  };

  // two counters per step of this call (Chunks): up to 14 steps per layer (10, and 4 more with LoRA rows), 2 after
  if (g_counters.size() < 2 * (static_cast<size_t>(M.layers) * 14 + 2))
    g_counters = std::vector<std::atomic<int>>(2 * (static_cast<size_t>(M.layers) * 14 + 2));
  // LoRA rows: out[t, off_m ..] += scale * B_m (A_m x[t]) for modules m0..m0+count-1 of layer l (one step)
  const bool has_lora = lora_ptrs != nullptr && lora_meta != nullptr;
  auto lora_add = [&](int l, int m0, int count, const float* x, int in_w, float* y, int ldy, const int* offsets,
                      const int* widths, Chunks& work) {
    work.run(T, [&](int lo, int hi) {
      float tmp[256];
      for (int t = lo; t < hi; ++t) {
        const float* xt = x + static_cast<size_t>(t) * in_w;
        for (int k = 0; k < count; ++k) {
          size_t ref = (static_cast<size_t>(t / q) * M.layers + l) * 7 + m0 + k;
          const float* A = reinterpret_cast<const float*>(lora_ptrs[2 * ref]);
          const float* B = reinterpret_cast<const float*>(lora_ptrs[2 * ref + 1]);
          if (A == nullptr) continue;
          int r = static_cast<int>(lora_meta[2 * ref]);
          float scale = lora_meta[2 * ref + 1];
          for (int j = 0; j < r; ++j) {
            const float* a = A + static_cast<size_t>(j) * in_w;
            __m256 acc = _mm256_setzero_ps();
            for (int i = 0; i < in_w; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(xt + i), acc);
            tmp[j] = hsum(acc) * scale;
          }
          float* yt = y + static_cast<size_t>(t) * ldy + offsets[k];
          for (int o = 0; o < widths[k]; ++o) {
            const float* b = B + static_cast<size_t>(o) * r;
            float v = 0.0f;
            for (int j = 0; j < r; ++j) v += b[j] * tmp[j];
            yt[o] += v;
          }
        }
      }
    });
  };
  const int qkv_off[3] = {0, qw, qw + kvw}, qkv_w3[3] = {qw, kvw, kvw};
  const int gu_off[2] = {0, F}, gu_w[2] = {F, F}, zero[1] = {0}, hidden_w[1] = {H};
  for (auto& c : g_counters) c.store(0, std::memory_order_relaxed);

  P.run([&](int tid, int nth) {
    Chunks work(g_counters.data(), nth);
    for (int l = 0; l < M.layers; ++l) {
      const Layer& ly = L[l];
      norm_rows(ly.attn_norm, work);
      q4_matmul(ly.qkv, Acts{S.q.data(), S.d.data(), S.s.data(), H}, T, S.qkv.data(), qkv_w, false, work);
      if (has_lora) lora_add(l, 0, 3, S.normed.data(), H, S.qkv.data(), qkv_w, qkv_off, qkv_w3, work);
      // rope on q and k (HF's rotate_half layout), then k and v into the cache at their write positions
      work.run(T, [&](int lo, int hi) {
        for (int t = lo; t < hi; ++t) {
          float* row = S.qkv.data() + static_cast<size_t>(t) * qkv_w;
          const float* c = M.rope_cos + pos[t] * half;
          const float* s = M.rope_sin + pos[t] * half;
          for (int hh = 0; hh < M.heads + M.kv_heads; ++hh) {
            float* x = row + hh * hd;
            for (int i = 0; i < half; i += 8) {
              __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + i + half);
              __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
              _mm256_storeu_ps(x + i, _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
              _mm256_storeu_ps(x + i + half, _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
            }
          }
          size_t base = l * l_stride + static_cast<size_t>(row_start + t / q) * r_stride + write_pos[t] * hd;
          for (int kh = 0; kh < M.kv_heads; ++kh) {
            const float* kx = row + qw + kh * hd;
            const float* vx = row + qw + kvw + kh * hd;
            for (int i = 0; i < hd; i += 8) {
              _mm_storeu_si128(reinterpret_cast<__m128i*>(kcache + base + kh * h_stride + i),
                               _mm256_cvtps_ph(_mm256_loadu_ps(kx + i), _MM_FROUND_TO_NEAREST_INT));
              _mm_storeu_si128(reinterpret_cast<__m128i*>(vcache + base + kh * h_stride + i),
                               _mm256_cvtps_ph(_mm256_loadu_ps(vx + i), _MM_FROUND_TO_NEAREST_INT));
            }
          }
        }
      });
      // attention: one (token, head) pair at a time, keys 0..p of the token's own row
      work.run(T * M.heads, [&](int lo, int hi) {
        float* sc = S.scores[tid].data();
        for (int job = lo; job < hi; ++job) {
          int t = job / M.heads, hh = job % M.heads, kh = hh / group;
          float* out = S.attn.data() + static_cast<size_t>(t) * qw + hh * hd;
          int p_end = static_cast<int>(write_pos[t]);
          if (p_end >= trash) {  // left padding: nothing to attend, its output is never used
            std::memset(out, 0, sizeof(float) * hd);
            continue;
          }
          const float* qx = S.qkv.data() + static_cast<size_t>(t) * qkv_w + hh * hd;
          size_t base = l * l_stride + static_cast<size_t>(row_start + t / q) * r_stride + kh * h_stride;
          const uint16_t* kb = kcache + base;
          const uint16_t* vb = vcache + base;
          float mx = -INFINITY;
          for (int p = 0; p <= p_end; ++p) {
            __m256 a = _mm256_setzero_ps();
            for (int i = 0; i < hd; i += 8)
              a = _mm256_fmadd_ps(_mm256_loadu_ps(qx + i),
                                  _mm256_cvtph_ps(_mm_loadu_si128(
                                      reinterpret_cast<const __m128i*>(kb + static_cast<size_t>(p) * hd + i))),
                                  a);
            sc[p] = hsum(a) * scale;
            mx = std::max(mx, sc[p]);
          }
          float sum = 0.0f;
          int p = 0;
          __m256 mv = _mm256_set1_ps(mx), sv = _mm256_setzero_ps();
          for (; p + 8 <= p_end + 1; p += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + p), mv));
            _mm256_storeu_ps(sc + p, e);
            sv = _mm256_add_ps(sv, e);
          }
          sum = hsum(sv);
          for (; p <= p_end; ++p) {
            sc[p] = std::exp(sc[p] - mx);
            sum += sc[p];
          }
          __m256 acc[32];
          for (int i = 0; i < hd / 8; ++i) acc[i] = _mm256_setzero_ps();
          for (int pp = 0; pp <= p_end; ++pp) {
            __m256 w = _mm256_set1_ps(sc[pp]);
            const uint16_t* vr = vb + static_cast<size_t>(pp) * hd;
            for (int i = 0; i < hd / 8; ++i)
              acc[i] = _mm256_fmadd_ps(
                  w, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + 8 * i))), acc[i]);
          }
          __m256 inv = _mm256_set1_ps(1.0f / sum);
          for (int i = 0; i < hd / 8; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inv));
        }
      });
      quantize_rows(S.attn.data(), qw, work);
      q4_matmul(ly.o, Acts{S.q.data(), S.d.data(), S.s.data(), qw}, T, h, H, true, work);
      if (has_lora) lora_add(l, 3, 1, S.attn.data(), qw, h, H, zero, hidden_w, work);
      norm_rows(ly.ffn_norm, work);
      q4_matmul(ly.gate_up, Acts{S.q.data(), S.d.data(), S.s.data(), H}, T, S.ffn.data(), 2 * F, false, work);
      if (has_lora) lora_add(l, 4, 2, S.normed.data(), H, S.ffn.data(), 2 * F, gu_off, gu_w, work);
      work.run(T, [&](int lo, int hi) {  // silu(gate) * up, quantised for the down projection
        const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
        for (int t = lo; t < hi; ++t) {
          const float* gu = S.ffn.data() + static_cast<size_t>(t) * 2 * F;
          float* a = S.act.data() + static_cast<size_t>(t) * F;
          for (int i = 0; i < F; i += 8) {
            __m256 g = _mm256_loadu_ps(gu + i);
            __m256 sg = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, neg))));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(sg, _mm256_loadu_ps(gu + F + i)));
          }
          quantize_row(a, F, S.q.data() + static_cast<size_t>(t) * F, S.d.data() + static_cast<size_t>(t) * F / GROUP,
                       S.s.data() + static_cast<size_t>(t) * F / GROUP);
        }
      });
      q4_matmul(ly.down, Acts{S.q.data(), S.d.data(), S.s.data(), F}, T, h, H, true, work);
      if (has_lora) lora_add(l, 6, 1, S.act.data(), F, h, H, zero, hidden_w, work);
    }
    // final norm of each row's last column, then the head
    work.run(n, [&](int lo, int hi) {
      for (int r = lo; r < hi; ++r) {
        float* y = S.normed.data() + static_cast<size_t>(r) * H;
        rmsnorm_row(h + (static_cast<size_t>(r) * q + q - 1) * H, M.final_norm, H, M.eps, y);
        quantize_row(y, H, S.q.data() + static_cast<size_t>(r) * H, S.d.data() + static_cast<size_t>(r) * H / GROUP,
                     S.s.data() + static_cast<size_t>(r) * H / GROUP);
      }
    });
    q8_matmul(Q8{M.head_q, M.head_d, M.vocab, H}, Acts{S.q.data(), S.d.data(), S.s.data(), H}, n, logits, M.vocab,
              work);
  });
  return 0;
}

// out[M, N] = x[M, K] W^T with x quantised per group as in the forward (for tests of the kernels alone)
int q4_matmul_f32(const uint8_t* wq, const float* wd, const float* wm, int N, int K, const float* x, int Mrows,
                  float* out, int threads) {
  if (K % GROUP || N % 8) return 1;
  std::lock_guard<std::mutex> lock(g_call);
  std::vector<int8_t> q;
  std::vector<float> d, s;
  quantize_all(x, Mrows, K, q, d, s);
  Q4 W{wq, wd, wm, N, K};
  std::atomic<int> counters[2] = {0, 0};
  pool(threads).run([&](int, int nth) {
    Chunks work(counters, nth);
    q4_matmul(W, Acts{q.data(), d.data(), s.data(), K}, Mrows, out, N, false, work);
  });
  return 0;
}

int q8_matmul_f32(const int8_t* wq, const float* wd, int N, int K, const float* x, int Mrows, float* out,
                  int threads) {
  if (K % GROUP || N % 8) return 1;
  std::lock_guard<std::mutex> lock(g_call);
  std::vector<int8_t> q;
  std::vector<float> d, s;
  quantize_all(x, Mrows, K, q, d, s);
  Q8 W{wq, wd, N, K};
  std::atomic<int> counters[2] = {0, 0};
  pool(threads).run([&](int, int nth) {
    Chunks work(counters, nth);
    q8_matmul(W, Acts{q.data(), d.data(), s.data(), K}, Mrows, out, N, work);
  });
  return 0;
}

}  // extern "C"
