// Fused attention of a few query rows (decode: one) over a quantized KV cache,
// single pass: one threadgroup of BN simdgroups per (batch, group of R query heads
// sharing a kv head, query row), so each cache byte is read once per group.
// Inputs:  q (B, Hq, L, D); scale (); keys kw/ks/kb and values vw/vs/vb in the ring
//          layouts of kv_attention.h; the full-precision tokens, NF = NS + NR of them, in
//          two parts read where they are (no joined copy): the sinks kf (B, H, NS, D),
//          vf (B, H, NS, DV), then kr (B, H, NR, D), vr (B, H, NR, DV) (residual, the
//          chunk itself: the last L are the query rows' own tokens, causal); with NEW
//          (decode, L = 1) a new token kn (B, H, 1, D), vn (B, H, 1, DV) that takes ring
//          slot nslot (B, H) int32: it is quantized here (its stored codes are not read)
//          and attended as its codes read back; dims = [NQ, A, NS, NR, L, H, Hq].
// Outputs: out (B, Hq, L, DV); with STATS the attention mass (B, Hq / R, L, NQ + NF)
//          each token got from the group's R rows, and the rows' scores (B, Hq, L, NQ + NF)
//          it is reduced from (scratch); with NEW the new token's codes, scales and
//          biases nkw (B, H, D * KB / 32), nks, nkb (B, H, D / KG), nvw, nvs, nvb
//          (written by the first group of each kv head). Outputs not asked for: (1,).
// Grid (32, BN, B * (Hq / R) * L), threadgroup (32, BN, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
int nq = dims[0], alloc = dims[1], ns = dims[2], nr = dims[3], L = dims[4], H = dims[5];
int Hq = dims[6];
int z = int(threadgroup_position_in_grid.z);
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
int slot = NEW ? nslot[bh] : -1;
if (NEW) {  // every threadgroup attends the new token; the kv head's first group stores it
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
    nq, alloc, ns + nr - L + l + 1, 0, ntok, slot, tk, tv, lane, sg, tm, tl, to,
    scores + (STATS ? row0 * ntok : 0), L * ntok, m, lsum, o);
if (sg == 0) {
  for (int r = 0; r < R; r++) {
    size_t row = row0 + size_t(r) * L;
    for (int e = 0; e < EV; e++) {
      out[row * DV + lane * EV + e] = static_cast<T>(o[r * EV + e]);
    }
    if (STATS && lane == 0) {
      tm[r] = m[r] + log(lsum[r]);  // the row's log-sum-exp (tm is free again)
    }
  }
}
if (STATS) {
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  mlxkv_attention_mass<R>(scores + row0 * ntok, L * ntok, tm, ntok, int(sg * 32 + lane),
                          32 * BN, mass + size_t(z) * ntok);
}
