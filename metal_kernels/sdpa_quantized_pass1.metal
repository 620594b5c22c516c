// Split-K pass 1 of the fused quantized-cache attention (long caches): the tokens of
// each query row are cut into NB blocks of BS; one threadgroup of BN simdgroups per
// (row, block) writes the block's unnormalized output and its softmax max and sum.
// Inputs:  as sdpa_quantized.metal, dims = [NQ, A, NF, L, H, Hq, NB, BS].
// Outputs: po (rows, NB, DV) float32, pm (rows, NB), pl (rows, NB); with STATS
//          scores (rows, NQ + NF) (else (1,), unwritten).
// Grid (32, BN, rows * NB), threadgroup (32, BN, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
int nq = dims[0], alloc = dims[1], nf = dims[2], L = dims[3], H = dims[4], Hq = dims[5];
int nb = dims[6], bs = dims[7];
int block = int(threadgroup_position_in_grid.z) % nb;
int row = int(threadgroup_position_in_grid.z) / nb;
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
int t0 = block * bs;
int t1 = min(t0 + bs, nq + nf);
mlxkv_attend_block<T, D, DV, KB, KG, VB, VG, KCH, BN, STATS>(
    q + size_t(row) * D, float(scale),
    kw + bh * kq, ks + bh * kg, kb + bh * kg,
    vw + bh * size_t(alloc) * (DV * VB / 32), vs + bh * size_t(alloc) * (DV / VG),
    vb + bh * size_t(alloc) * (DV / VG),
    kf + bh * size_t(nf) * D, vf + bh * size_t(nf) * DV,
    nq, alloc, nf - L + l + 1, t0, t1, lane, sg, tm, tl, to,
    scores + (STATS ? size_t(row) * (nq + nf) : 0), m, lsum, o);
if (sg == 0) {
  size_t at = size_t(row) * nb + block;
  for (int e = 0; e < EV; e++) {
    po[at * DV + lane * EV + e] = o[e];
  }
  if (lane == 0) {
    pm[at] = m;
    pl[at] = lsum;
  }
}
