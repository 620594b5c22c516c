// Shared helpers of mlxkv's compressed-cache attention kernels (the header of
// sdpa_quantized*.metal, after affine.h). Layouts are those of mlxkv.cache.codec:
//   per-token codes  (B, H, A, W)  W = dim * bits / 32 uint32 words per token,
//                    scales/biases (B, H, A, dim / group);
//   per-channel keys (B, H, D, A * bits / 32) words, scales/biases (B, H, D, A / group),
// where A is the allocated ring length; codes are an LSB-first bit stream, the layout
// mx.quantize produces for 2, 3, 4 and 8 bits. value = scale * code + bias.

#define MLXKV_TILE 4  // tokens a simdgroup scores before one softmax update

// A lane's E consecutive elements from d0 fall in the group of G elements holding d0 and,
// when E does not divide G (head dims 96, 160, 192: E = 3, 5, 6), maybe in the next one
// too: how many of them are in the first group.
template <int E, int G>
inline int mlxkv_in_first_group(int d0) {
  static_assert(G >= E, "a lane's elements span two groups at most");
  return G % E == 0 ? E : min(E, G - d0 % G);
}

// Quantize one token's DX values (lane l owns values l*DX/32 ..) in groups of G values, as
// quantize_rows does: this lane's dequantized values go to `deq` (through the stored,
// T-rounded scale and bias, as a reader of the codes sees them); with `write` the codes,
// scales and biases go to w/s/b. Called by one whole simdgroup; `codes` is DX bytes of
// threadgroup scratch.
template <typename T, int DX, int BITS, int G>
void mlxkv_quantize_token(const device T* x, uint lane, threadgroup float* deq,
                          threadgroup uint8_t* codes, bool write, device uint32_t* w,
                          device T* s, device T* b) {
  constexpr int E = DX / 32;
  const int d0 = int(lane) * E;
  const int cut = mlxkv_in_first_group<E, G>(d0);
  float v[E];
  for (int e = 0; e < E; e++) {
    v[e] = float(x[d0 + e]);
  }
  // each group's range over the simdgroup; this lane keeps the scale and bias of the
  // groups of its first and last elements (the same group unless it straddles two)
  mlxkv_affine first, last;
  for (int g = 0; g < DX / G; g++) {
    float lo = INFINITY, hi = -INFINITY;
    for (int e = 0; e < E; e++) {
      if ((d0 + e) / G == g) {
        lo = min(lo, v[e]);
        hi = max(hi, v[e]);
      }
    }
    lo = simd_min(lo);
    hi = simd_max(hi);
    mlxkv_affine sb = mlxkv_affine_params(lo, hi, BITS);
    if (write && lane == 0) {
      s[g] = static_cast<T>(sb.scale);
      b[g] = static_cast<T>(sb.bias);
    }
    if (g == d0 / G) {
      first = sb;
    }
    if (g == (d0 + E - 1) / G) {
      last = sb;
    }
  }
  for (int e = 0; e < E; e++) {
    mlxkv_affine sb = e < cut ? first : last;
    uint code = mlxkv_affine_code(v[e], sb, BITS);
    codes[d0 + e] = uint8_t(code);
    deq[d0 + e] = float(static_cast<T>(sb.scale)) * float(code) + float(static_cast<T>(sb.bias));
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  if (write) {
    for (int word = int(lane); word < DX * BITS / 32; word += 32) {
      w[word] = mlxkv_pack_word(codes, DX, BITS, word);
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);  // `codes` may be reused at once
}

// A decode step's new token for kv head `bh` (sdpa_quantized*.metal with NEW): simdgroup
// 0 quantizes its key kn and value vn into `tk`/`tv` (dequantized, for every reader in
// the threadgroup) and, if `owner` (the kv head's first group of query heads), writes
// their codes, scales and biases to the nk*/nv* outputs. Called by the whole threadgroup
// (it ends in a barrier); `tc` is max(D, DV) bytes of scratch.
template <typename T, int D, int DV, int KB, int KG, int VB, int VG>
void mlxkv_new_token(const device T* kn, const device T* vn, size_t bh, bool owner,
                     uint lane, uint sg, threadgroup float* tk, threadgroup float* tv,
                     threadgroup uint8_t* tc, device uint32_t* nkw, device T* nks,
                     device T* nkb, device uint32_t* nvw, device T* nvs, device T* nvb) {
  if (sg == 0) {
    mlxkv_quantize_token<T, D, KB, KG>(kn + bh * D, lane, tk, tc, owner, nkw + bh * (D * KB / 32),
                                       nks + bh * (D / KG), nkb + bh * (D / KG));
    mlxkv_quantize_token<T, DV, VB, VG>(vn + bh * DV, lane, tv, tc, owner,
                                        nvw + bh * (DV * VB / 32), nvs + bh * (DV / VG),
                                        nvb + bh * (DV / VG));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Online softmax attention of the R query heads of one GQA group (rows at the same
// position, `qstride` apart) over tokens [t0, t1) of a cache made of nq quantized ring
// slots followed by full-precision tokens: ns sinks (ks_/vs_ below: kf/vf) then the rest
// (kr/vr: residual, chunk), of which the first `visible_f` are visible to these rows.
// Each key and value element is read and dequantized once and serves all R heads. The
// BN simdgroups of the threadgroup take tokens in turn, MLXKV_TILE at a time (one
// max/rescale per tile and head); each lane owns D/32 query elements and DV/32 output
// elements of every head, in one quantization group or two. Ring slot `slot` (-1: none)
// is read from `tk`/`tv` (a new token, dequantized in threadgroup memory) instead of its
// stored codes.
// On return, simdgroup 0 holds per head r the block's max score `m_out[r]`, normalizer
// `l_out[r]` and output `o_out[r * DV/32 ..]`, normalized by l_out (so within the values'
// range whatever the block's length, as MLX's sdpa_vector_2pass keeps its partials; m =
// -inf, l = 0 and o = 0 when no token is visible). With STATS, head r's scaled score of every token of the range goes to
// scores[r * sstride + t] (-inf for tokens the rows cannot see).
template <typename T, int D, int DV, int KB, int KG, int VB, int VG, bool KCH, int BN, int R,
          bool STATS>
void mlxkv_attend_block(
    const device T* q, int qstride, float scale,
    const device uint32_t* kw, const device T* ks, const device T* kb,
    const device uint32_t* vw, const device T* vs, const device T* vb,
    const device T* kf, const device T* vf, int ns, const device T* kr, const device T* vr,
    int nq, int alloc, int visible_f, int t0, int t1, int slot,
    const threadgroup float* tk, const threadgroup float* tv, uint lane, uint sg,
    threadgroup float* tm, threadgroup float* tl, threadgroup float* to,
    device float* scores, int sstride, thread float* m_out, thread float* l_out,
    thread float* o_out) {
  constexpr int E = D / 32;
  constexpr int EV = DV / 32;
  const int d0 = int(lane) * E;    // this lane's first key element
  const int dv0 = int(lane) * EV;  // and value element
  // a lane's first kcut key elements (vcut value elements) are in one group, the rest in
  // the next (per-token groups; all in one unless E does not divide the group)
  const int kcut = KCH ? E : mlxkv_in_first_group<E, KG>(d0);
  const int vcut = mlxkv_in_first_group<EV, VG>(dv0);
  // The query, pre-scaled, and per head the sums of this lane's elements in its two key
  // groups: a per-token key group's bias comes out of the dot product,
  // sum(q * (s * c + b)) = s * sum(q * c) + b * sum(q).
  float qe[R * E];
  float qsum[R * 2];
  for (int r = 0; r < R; r++) {
    qsum[2 * r] = 0.0f;
    qsum[2 * r + 1] = 0.0f;
    for (int e = 0; e < E; e++) {
      qe[r * E + e] = float(q[r * qstride + d0 + e]) * scale;
      qsum[2 * r + (e < kcut ? 0 : 1)] += qe[r * E + e];
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
  for (int base = t0 + int(sg); base < t1; base += BN * MLXKV_TILE) {
    // scores of the tile's tokens (every lane holds them after simd_sum)
    float s[MLXKV_TILE * R];
    for (int j = 0; j < MLXKV_TILE; j++) {
      int t = base + j * BN;
      bool quant = t < nq;
      if (t >= t1 || (!quant && t - nq >= visible_f)) {  // uniform across the simdgroup
        for (int r = 0; r < R; r++) {
          s[j * R + r] = -INFINITY;
        }
        if (STATS && lane == 0 && t < t1) {
          for (int r = 0; r < R; r++) {
            scores[r * sstride + t] = -INFINITY;
          }
        }
        continue;
      }
      float part[R];
      if (quant && t != slot && !KCH) {  // codes: word loads, the bias factored out
        const device uint32_t* kt = kw + t * (D * KB / 32);
        int g = t * (D / KG) + d0 / KG;
        int g1 = kcut < E ? g + 1 : g;
        float ksc = float(ks[g]), ksc1 = float(ks[g1]);
        float kbi = float(kb[g]), kbi1 = float(kb[g1]);
        float c[E];
        for (int e = 0; e < E; e++) {
          c[e] = float(mlxkv_code(kt, uint((d0 + e) * KB), KB));
        }
        for (int r = 0; r < R; r++) {
          float dot = 0.0f, dot1 = 0.0f;
          for (int e = 0; e < E; e++) {
            if (e < kcut) {
              dot += qe[r * E + e] * c[e];
            } else {
              dot1 += qe[r * E + e] * c[e];
            }
          }
          part[r] = ksc * dot + kbi * qsum[2 * r];
          if (kcut < E) {
            part[r] += ksc1 * dot1 + kbi1 * qsum[2 * r + 1];
          }
        }
      } else {
        float k[E];
        for (int e = 0; e < E; e++) {
          int d = d0 + e;
          if (!quant) {
            int j = t - nq;  // a sink, or past them
            k[e] = float(j < ns ? kf[j * D + d] : kr[(j - ns) * D + d]);
          } else if (t == slot) {
            k[e] = tk[d];
          } else {  // per channel: codes along the tokens, a group per channel
            uint code = mlxkv_code(kw + d * (alloc * KB / 32), uint(t * KB), KB);
            int g = d * (alloc / KG) + t / KG;
            k[e] = float(ks[g]) * float(code) + float(kb[g]);
          }
        }
        for (int r = 0; r < R; r++) {
          part[r] = 0.0f;
          for (int e = 0; e < E; e++) {
            part[r] += qe[r * E + e] * k[e];
          }
        }
      }
      for (int r = 0; r < R; r++) {
        s[j * R + r] = simd_sum(part[r]);
        if (STATS && lane == 0) {
          scores[r * sstride + t] = s[j * R + r];
        }
      }
    }
    // one softmax update per head for the whole tile
    float p[MLXKV_TILE * R];
    for (int r = 0; r < R; r++) {
      float m_new = m[r];
      for (int j = 0; j < MLXKV_TILE; j++) {
        m_new = max(m_new, s[j * R + r]);
      }
      if (m_new == -INFINITY) {  // nothing visible yet for this head
        for (int j = 0; j < MLXKV_TILE; j++) {
          p[j * R + r] = 0.0f;
        }
        continue;
      }
      float factor = fast::exp(m[r] - m_new);
      l[r] *= factor;
      for (int e = 0; e < EV; e++) {
        o[r * EV + e] *= factor;
      }
      for (int j = 0; j < MLXKV_TILE; j++) {
        p[j * R + r] = fast::exp(s[j * R + r] - m_new);  // 0 for an invisible token
        l[r] += p[j * R + r];
      }
      m[r] = m_new;
    }
    for (int j = 0; j < MLXKV_TILE; j++) {
      int t = base + j * BN;
      if (t >= t1 || (t >= nq && t - nq >= visible_f)) {
        continue;
      }
      float v[EV];
      if (t >= nq) {
        int j = t - nq;
        const device T* vp = j < ns ? vf + j * DV : vr + (j - ns) * DV;
        for (int e = 0; e < EV; e++) {
          v[e] = float(vp[dv0 + e]);
        }
      } else if (t == slot) {
        for (int e = 0; e < EV; e++) {
          v[e] = tv[dv0 + e];
        }
      } else {
        const device uint32_t* vt = vw + t * (DV * VB / 32);
        int g = t * (DV / VG) + dv0 / VG;
        int g1 = vcut < EV ? g + 1 : g;
        float vsc = float(vs[g]), vsc1 = float(vs[g1]);
        float vbi = float(vb[g]), vbi1 = float(vb[g1]);
        for (int e = 0; e < EV; e++) {
          float code = float(mlxkv_code(vt, uint((dv0 + e) * VB), VB));
          v[e] = e < vcut ? vsc * code + vbi : vsc1 * code + vbi1;
        }
      }
      for (int r = 0; r < R; r++) {
        for (int e = 0; e < EV; e++) {
          o[r * EV + e] += p[j * R + r] * v[e];
        }
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
      to[sg * DV + dv0 + e] = o[r * EV + e];
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
        float f = fast::exp(tm[r * BN + i] - mx_);
        lsum += tl[r * BN + i] * f;
        for (int e = 0; e < EV; e++) {
          o_out[r * EV + e] += to[i * DV + dv0 + e] * f;
        }
      }
      for (int e = 0; e < EV; e++) {
        o_out[r * EV + e] = lsum > 0.0f ? o_out[r * EV + e] / lsum : 0.0f;
      }
      m_out[r] = mx_;
      l_out[r] = lsum;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// Attention mass each of `ntok` tokens got from the R rows whose scores are `sstride`
// apart from `scores`, given each row's log-sum-exp `lse[r]` (threadgroup memory): the sum
// over rows of softmax probabilities, written to mass[t]. The threadgroup's `nthreads`
// threads (this one is `tid`) take tokens in turn; the scores are this launch's or an
// earlier one's, visible after a device-memory barrier.
template <int R>
void mlxkv_attention_mass(const device float* scores, int sstride, const threadgroup float* lse,
                          int ntok, int tid, int nthreads, device float* mass) {
  for (int t = tid; t < ntok; t += nthreads) {
    float acc = 0.0f;
    for (int r = 0; r < R; r++) {
      float s = scores[r * sstride + t];
      if (s != -INFINITY) {
        acc += fast::exp(s - lse[r]);
      }
    }
    mass[t] = acc;
  }
}
