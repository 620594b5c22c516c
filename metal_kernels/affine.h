// Affine group quantization as mlxkv stores it: value = scale * code + bias, codes an
// LSB-first bit stream of `bits`-bit codes in uint32 words (the layout of mx.quantize).
// The rounding is MLX's CPU mx.quantize's (the group's min and max from its values, the
// edge of larger magnitude represented exactly, rint), so a kernel quantizing here gives
// the reference's codes. Shared by quantize_rows.metal and the attention kernels (which
// quantize a decode step's new token in registers).

// A group's scale and bias as float (stored rounded to T).
struct mlxkv_affine {
  float scale;
  float bias;
};

// Scale and bias of a group whose values span [lo, hi].
inline mlxkv_affine mlxkv_affine_params(float lo, float hi, int bits) {
  float n_bins = float((1 << bits) - 1);
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
  mlxkv_affine sb;
  sb.scale = scale;
  sb.bias = bias;
  return sb;
}

// The code of x in a group of scale and bias `sb` (the float values, not the rounded ones).
inline uint mlxkv_affine_code(float x, mlxkv_affine sb, int bits) {
  float c = rint((x - sb.bias) / sb.scale);
  return uint(clamp(c, 0.0f, float((1 << bits) - 1)));
}

// The `bits`-bit code starting at bit `bit` of the word stream `w` (one or two word loads).
inline uint mlxkv_code(const device uint32_t* w, uint bit, uint bits) {
  uint at = bit >> 5;
  uint shift = bit & 31;
  uint v = w[at] >> shift;
  if (shift + bits > 32) {
    v |= w[at + 1] << (32 - shift);
  }
  return v & ((1u << bits) - 1u);
}

// Word `word` of the stream of codes `codes[0..n)` (`bits` each): the codes that overlap
// its 32 bits, shifted into place.
inline uint32_t mlxkv_pack_word(const threadgroup uint8_t* codes, int n, int bits, int word) {
  int first = (32 * word) / bits;
  int last = min((32 * word + 31) / bits, n - 1);
  uint32_t out = 0;
  for (int c = first; c <= last; c++) {
    int at = c * bits - 32 * word;  // where code c starts, relative to the word
    uint32_t code = codes[c];
    out |= at < 0 ? code >> uint(-at) : code << uint(at);
  }
  return out;
}
