// Split-K pass 1 of the fused quantized-cache attention (long caches): the tokens are
// cut into NB blocks of BS; one threadgroup of BN simdgroups per (batch, group of R
// query heads sharing a kv head, query row, block) reads its block of the cache once
// and writes, per head, the block's output (normalized by its own sum, so a long block
// of large values cannot overflow a float16 partial) and its softmax max and sum.
// Inputs:  as sdpa_quantized.metal, dims = [NQ, A, NS, NR, L, H, Hq, NB, BS].
// Outputs: po (rows, NB, DV) of type T, pm (rows, NB), pl (rows, NB) float32,
//          rows = B * Hq * L; with STATS the scores (rows, NQ + NF) pass 2 reduces to
//          the attention mass; with NEW the new token's codes (as sdpa_quantized.metal,
//          written by the block that holds its slot). Outputs not asked for: (1,).
// Grid (32, BN, B * (Hq / R) * L * NB), threadgroup (32, BN, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
int nq = dims[0], alloc = dims[1], ns = dims[2], nr = dims[3], L = dims[4], H = dims[5];
int Hq = dims[6];
int nb = dims[7], bs = dims[8];
int block = int(threadgroup_position_in_grid.z) % nb;
int z = int(threadgroup_position_in_grid.z) / nb;
int l = z % L;
int g = (z / L) % (Hq / R);
int b = z / (L * (Hq / R));
int hq0 = g * R;
int bh = b * H + hq0 / (Hq / H);
size_t row0 = (size_t(b) * Hq + hq0) * L + l;  // head hq0 + r is row row0 + r * L
constexpr int EV = DV / 32;
threadgroup float tm[R * BN];
threadgroup float tl[R * BN];
threadgroup float to[BN * DV];
threadgroup float tk[NEW ? D : 1];
threadgroup float tv[NEW ? DV : 1];
threadgroup uint8_t tc[NEW ? (D > DV ? D : DV) : 1];
float m[R];
float lsum[R];
float o[R * EV];
int ntok = nq + ns + nr;
int t0 = block * bs;
int t1 = min(t0 + bs, ntok);
int slot = NEW ? nslot[bh] : -1;
if (NEW && slot >= t0 && slot < t1) {  // uniform across the threadgroup
  mlxkv_new_token<T, D, DV, KB, KG, VB, VG>(kn, vn, size_t(bh), hq0 % (Hq / H) == 0, lane, sg,
                                            tk, tv, tc, nkw, nks, nkb, nvw, nvs, nvb);
}
size_t kq = KCH ? size_t(D) * (alloc * KB / 32) : size_t(alloc) * (D * KB / 32);
size_t kg = KCH ? size_t(D) * (alloc / KG) : size_t(alloc) * (D / KG);
mlxkv_attend_block<T, D, DV, KB, KG, VB, VG, KCH, BN, R, STATS>(
    q + row0 * D, L * D, float(scale),
    kw + bh * kq, ks + bh * kg, kb + bh * kg,
    vw + bh * size_t(alloc) * (DV * VB / 32), vs + bh * size_t(alloc) * (DV / VG),
    vb + bh * size_t(alloc) * (DV / VG),
    kf + bh * size_t(ns) * D, vf + bh * size_t(ns) * DV, ns,
    kr + bh * size_t(nr) * D, vr + bh * size_t(nr) * DV,
    nq, alloc, ns + nr - L + l + 1, t0, t1, slot, tk, tv, lane, sg, tm, tl, to,
    scores + (STATS ? row0 * ntok : 0), L * ntok, m, lsum, o);
if (sg == 0) {
  for (int r = 0; r < R; r++) {
    size_t at = (row0 + size_t(r) * L) * nb + block;
    for (int e = 0; e < EV; e++) {
      po[at * DV + lane * EV + e] = static_cast<T>(o[r * EV + e]);
    }
    if (lane == 0) {
      pm[at] = m[r];
      pl[at] = lsum[r];
    }
  }
}
