// Split-K pass 2: combines the NB block results of pass 1 into each row's output (block
// i's output po_i is normalized by its own sum l_i: out = sum_i po_i * l_i * exp(m_i - m)
// / sum_i l_i * exp(m_i - m)), and with STATS reduces the group's scores to the attention
// mass of each token.
// Inputs:  po (rows, NB, DV) of type T, pm (rows, NB), pl (rows, NB) float32, with STATS
//          pass 1's scores (rows, NQ + NF) (else (1,)); dims = [NB, L, Hq, NQ + NF].
// Outputs: out (rows, DV) of type T; with STATS mass (B, Hq / R, L, NQ + NF) float32
//          (else (1,), unwritten).
// Grid (32, R, B * (Hq / R) * L), threadgroup (32, R, 1): simdgroup r combines head
// hq0 + r of the group, its lanes owning DV/32 output elements each.
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
int nb = dims[0], L = dims[1], Hq = dims[2], ntok = dims[3];
int z = int(threadgroup_position_in_grid.z);
int l = z % L;
int g = (z / L) % (Hq / R);
int b = z / (L * (Hq / R));
size_t row0 = (size_t(b) * Hq + g * R) * L + l;
size_t row = row0 + size_t(sg) * L;
constexpr int EV = DV / 32;
threadgroup float lse[R];
size_t at = row * nb;
float m = -INFINITY;
for (int i = 0; i < nb; i++) {
  m = max(m, pm[at + i]);
}
float lsum = 0.0f;
float o[EV];
for (int e = 0; e < EV; e++) {
  o[e] = 0.0f;
}
for (int i = 0; i < nb; i++) {
  if (pm[at + i] == -INFINITY) {
    continue;
  }
  float f = pl[at + i] * fast::exp(pm[at + i] - m);
  lsum += f;
  for (int e = 0; e < EV; e++) {
    o[e] += float(po[(at + i) * DV + lane * EV + e]) * f;
  }
}
for (int e = 0; e < EV; e++) {
  out[row * DV + lane * EV + e] = lsum > 0.0f ? static_cast<T>(o[e] / lsum) : static_cast<T>(0);
}
if (STATS) {
  if (lane == 0) {
    lse[sg] = m + log(lsum);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  mlxkv_attention_mass<R>(scores + row0 * ntok, L * ntok, lse, ntok, int(sg * 32 + lane),
                          32 * R, mass + size_t(z) * ntok);
}
