// Affine quantization of rows into mlxkv's packed layout (the layout and rounding of
// mx.quantize): one thread per (row, group of G values).
// Inputs:  x (N, DX) of type T; dims = [N, DX].
// Outputs: w (N, DX * BITS / 32) uint32, scales (N, DX / G) T, biases (N, DX / G) T.
// Grid (DX / G, N, 1), threadgroup (min(DX / G, 32), 1, 1).
uint g = thread_position_in_grid.x;
uint r = thread_position_in_grid.y;
int n = dims[0], dx = dims[1];
if (int(r) >= n || int(g) >= dx / G) {
  return;
}
const device T* xs = x + size_t(r) * dx + size_t(g) * G;
float lo = float(xs[0]), hi = float(xs[0]);
for (int i = 1; i < G; i++) {
  lo = min(lo, float(xs[i]));
  hi = max(hi, float(xs[i]));
}
// The edge with the larger magnitude is represented exactly (as mx.quantize does).
constexpr float n_bins = float((1 << BITS) - 1);
bool low_edge = abs(lo) > abs(hi);
float scale = max((hi - lo) / n_bins, 1e-7f);
scale = low_edge ? scale : -scale;
float edge = low_edge ? lo : hi;
float q0 = rint(edge / scale);
float bias = 0.0f;
if (q0 != 0.0f) {
  scale = edge / q0;
  bias = edge;
}
T scale_t = static_cast<T>(scale);
T bias_t = static_cast<T>(bias);
scales[size_t(r) * (dx / G) + g] = scale_t;
biases[size_t(r) * (dx / G) + g] = bias_t;
// Codes of this group fill G * BITS / 32 whole words: an LSB-first bit stream.
device uint32_t* out = w + size_t(r) * (dx * BITS / 32) + size_t(g) * (G * BITS / 32);
uint64_t acc = 0;
int filled = 0;
int word = 0;
for (int i = 0; i < G; i++) {
  float c = rint((float(xs[i]) - bias) / scale);
  uint code = uint(clamp(c, 0.0f, n_bins));
  acc |= uint64_t(code) << filled;
  filled += BITS;
  if (filled >= 32) {
    out[word++] = uint32_t(acc & 0xffffffffu);
    acc >>= 32;
    filled -= 32;
  }
}
