// Split-K pass 2: combines the NB block results of pass 1 into each row's output.
// Inputs:  po (rows, NB, DV) of type T, pm (rows, NB), pl (rows, NB) float32; dims = [NB].
// Outputs: out (rows, DV) of type T; with STATS lse (rows,) (else (1,), unwritten).
// Grid (32, 1, rows), threadgroup (32, 1, 1): lane owns DV/32 output elements.
uint lane = thread_index_in_simdgroup;
int row = int(threadgroup_position_in_grid.z);
int nb = dims[0];
constexpr int EV = DV / 32;
size_t at = size_t(row) * nb;
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
  float f = exp(pm[at + i] - m);
  lsum += pl[at + i] * f;
  for (int e = 0; e < EV; e++) {
    o[e] += float(po[(at + i) * DV + lane * EV + e]) * f;
  }
}
for (int e = 0; e < EV; e++) {
  out[size_t(row) * DV + lane * EV + e] = lsum > 0.0f ? static_cast<T>(o[e] / lsum) : static_cast<T>(0);
}
if (STATS && lane == 0) {
  lse[row] = m + log(lsum);
}
