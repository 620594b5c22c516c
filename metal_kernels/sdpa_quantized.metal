// Fused attention of a few query rows (decode: one) over a quantized KV cache,
// single pass: one threadgroup of BN simdgroups per query row.
// Inputs:  q (B, Hq, L, D); scale (); keys kw/ks/kb and values vw/vs/vb in the ring
//          layouts of kv_attention.h; kf (B, H, NF, D), vf (B, H, NF, DV) the
//          full-precision tokens (sinks, residual, the chunk itself: the last L of them
//          are the query rows' own tokens, causal); dims = [NQ, A, NF, L, H, Hq].
// Outputs: out (B, Hq, L, DV); with STATS scores (B, Hq, L, NQ + NF) and lse
//          (B, Hq, L) (else both of shape (1,), unwritten).
// Grid (32, BN, B * Hq * L), threadgroup (32, BN, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
int row = int(threadgroup_position_in_grid.z);
int nq = dims[0], alloc = dims[1], nf = dims[2], L = dims[3], H = dims[4], Hq = dims[5];
int l = row % L;
int hq = (row / L) % Hq;
int b = row / (L * Hq);
int bh = b * H + hq / (Hq / H);
constexpr int EV = DV / 32;
threadgroup float tm[BN];
threadgroup float tl[BN];
threadgroup float to[BN * DV];
float m, lsum;
float o[EV];
size_t kq = KCH ? size_t(D) * (alloc * KB / 32) : size_t(alloc) * (D * KB / 32);
size_t kg = KCH ? size_t(D) * (alloc / KG) : size_t(alloc) * (D / KG);
mlxkv_attend_block<T, D, DV, KB, KG, VB, VG, KCH, BN, STATS>(
    q + size_t(row) * D, float(scale),
    kw + bh * kq, ks + bh * kg, kb + bh * kg,
    vw + bh * size_t(alloc) * (DV * VB / 32), vs + bh * size_t(alloc) * (DV / VG),
    vb + bh * size_t(alloc) * (DV / VG),
    kf + bh * size_t(nf) * D, vf + bh * size_t(nf) * DV,
    nq, alloc, nf - L + l + 1, 0, nq + nf, lane, sg, tm, tl, to,
    scores + (STATS ? size_t(row) * (nq + nf) : 0), m, lsum, o);
if (sg == 0) {
  for (int e = 0; e < EV; e++) {
    out[size_t(row) * DV + lane * EV + e] = lsum > 0.0f ? static_cast<T>(o[e] / lsum) : static_cast<T>(0);
  }
  if (STATS && lane == 0) {
    lse[row] = m + log(lsum);
  }
}
