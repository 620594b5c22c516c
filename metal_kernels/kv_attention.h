// Shared helpers of mlxkv's compressed-cache attention kernels (the `header` of
// sdpa_quantized*.metal). Layouts are those of mlxkv.cache.codec:
//   per-token codes  (B, H, A, W)  W = dim * bits / 32 uint32 words per token,
//                    scales/biases (B, H, A, dim / group);
//   per-channel keys (B, H, D, A * bits / 32) words, scales/biases (B, H, D, A / group),
// where A is the allocated ring length; codes are an LSB-first bit stream, the layout
// mx.quantize produces for 2, 3, 4 and 8 bits. value = scale * code + bias.

// The `bits`-bit code starting at bit `bit` of the stream at `p`.
inline uint mlxkv_code(const device uint8_t* p, uint bit, uint bits) {
  uint at = bit >> 3;
  uint shift = bit & 7;
  uint v = p[at];
  if (shift + bits > 8) {
    v |= uint(p[at + 1]) << 8;
  }
  return (v >> shift) & ((1u << bits) - 1u);
}

// Online softmax attention of the R query heads of one GQA group (rows at the same
// position, `qstride` apart) over tokens [t0, t1) of a cache made of nq quantized ring
// slots followed by nf full-precision tokens (of which the first `visible_f` are visible
// to these rows). Each key and value element is read and dequantized once and serves all
// R heads. The BN simdgroups of the threadgroup take tokens in turn; each lane owns D/32
// query elements and DV/32 output elements of every head.
// On return, simdgroup 0 holds per head r the block's max score `m_out[r]`, normalizer
// `l_out[r]` and unnormalized output `o_out[r * DV/32 ..]` (m = -inf, l = 0 when no token
// is visible). With STATS, head r's scaled score of every token of the range goes to
// scores[r * sstride + t] (-inf for tokens the rows cannot see).
template <typename T, int D, int DV, int KB, int KG, int VB, int VG, bool KCH, int BN, int R,
          bool STATS>
void mlxkv_attend_block(
    const device T* q, int qstride, float scale,
    const device uint32_t* kw, const device T* ks, const device T* kb,
    const device uint32_t* vw, const device T* vs, const device T* vb,
    const device T* kf, const device T* vf,
    int nq, int alloc, int visible_f, int t0, int t1, uint lane, uint sg,
    threadgroup float* tm, threadgroup float* tl, threadgroup float* to,
    device float* scores, int sstride, thread float* m_out, thread float* l_out,
    thread float* o_out) {
  constexpr int E = D / 32;
  constexpr int EV = DV / 32;
  float qe[R * E];
  for (int r = 0; r < R; r++) {
    for (int e = 0; e < E; e++) {
      qe[r * E + e] = float(q[r * qstride + lane * E + e]) * scale;
    }
  }
  float m[R];
  float l[R];
  float o[R * EV];
  for (int r = 0; r < R; r++) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int e = 0; e < EV; e++) {
      o[r * EV + e] = 0.0f;
    }
  }
  for (int t = t0 + int(sg); t < t1; t += BN) {
    bool quant = t < nq;
    if (!quant && t - nq >= visible_f) {
      if (STATS && lane == 0) {
        for (int r = 0; r < R; r++) {
          scores[r * sstride + t] = -INFINITY;
        }
      }
      continue;  // uniform across the simdgroup: every lane has the same t
    }
    float k[E];
    if (quant) {
      for (int e = 0; e < E; e++) {
        int d = int(lane) * E + e;
        uint code;
        int g;
        if (KCH) {
          code = mlxkv_code((const device uint8_t*)(kw + d * (alloc * KB / 32)), uint(t * KB), KB);
          g = d * (alloc / KG) + t / KG;
        } else {
          code = mlxkv_code((const device uint8_t*)(kw + t * (D * KB / 32)), uint(d * KB), KB);
          g = t * (D / KG) + d / KG;
        }
        k[e] = float(ks[g]) * float(code) + float(kb[g]);
      }
    } else {
      const device T* kp = kf + (t - nq) * D + lane * E;
      for (int e = 0; e < E; e++) {
        k[e] = float(kp[e]);
      }
    }
    float v[EV];
    for (int e = 0; e < EV; e++) {
      int d = int(lane) * EV + e;
      if (quant) {
        uint code = mlxkv_code((const device uint8_t*)(vw + t * (DV * VB / 32)), uint(d * VB), VB);
        int g = t * (DV / VG) + d / VG;
        v[e] = float(vs[g]) * float(code) + float(vb[g]);
      } else {
        v[e] = float(vf[(t - nq) * DV + d]);
      }
    }
    for (int r = 0; r < R; r++) {
      float part = 0.0f;
      for (int e = 0; e < E; e++) {
        part += qe[r * E + e] * k[e];
      }
      float s = simd_sum(part);
      if (STATS && lane == 0) {
        scores[r * sstride + t] = s;
      }
      float m_new = max(m[r], s);
      float factor = exp(m[r] - m_new);
      float p = exp(s - m_new);
      l[r] = l[r] * factor + p;
      m[r] = m_new;
      for (int e = 0; e < EV; e++) {
        o[r * EV + e] = o[r * EV + e] * factor + p * v[e];
      }
    }
  }
  if (lane == 0) {
    for (int r = 0; r < R; r++) {
      tm[r * BN + sg] = m[r];
      tl[r * BN + sg] = l[r];
    }
  }
  // One head at a time through `to` (BN * DV floats), so threadgroup memory does not
  // grow with R.
  for (int r = 0; r < R; r++) {
    for (int e = 0; e < EV; e++) {
      to[sg * DV + lane * EV + e] = o[r * EV + e];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
      float mx_ = -INFINITY;
      for (int i = 0; i < BN; i++) {
        mx_ = max(mx_, tm[r * BN + i]);
      }
      float lsum = 0.0f;
      for (int e = 0; e < EV; e++) {
        o_out[r * EV + e] = 0.0f;
      }
      for (int i = 0; i < BN; i++) {
        if (tm[r * BN + i] == -INFINITY) {
          continue;  // a simdgroup that saw no visible token
        }
        float f = exp(tm[r * BN + i] - mx_);
        lsum += tl[r * BN + i] * f;
        for (int e = 0; e < EV; e++) {
          o_out[r * EV + e] += to[i * DV + lane * EV + e] * f;
        }
      }
      m_out[r] = mx_;
      l_out[r] = lsum;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
