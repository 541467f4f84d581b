// MinHash signatures, LSH banding and exact shingle-set Jaccard, free of Python and of the GIL.
//
// The hashing is defined bit for bit in unlearn_fast/similarity/minhash.py (module docstring);
// tests/test_minhash.py holds a pure-Python reference that must reproduce these functions exactly.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace unlearn_fast::minhash {

// splitmix64's increment (2^64 / golden ratio) and finaliser constants.
inline constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64 finaliser: a bijection on 64 bits with full avalanche, two multiplies.
inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return z;
}

// The j-th output of a splitmix64 stream started at `seed`: key 0 keys the shingle hash,
// keys 1..num_perm key the permutations, so a shorter signature is a prefix of a longer one.
inline uint64_t stream_key(uint64_t seed, uint64_t j) { return mix64(seed + (j + 1) * kGolden); }

enum class Unit { kChar, kWord };

struct ShingleSpec {
  int64_t ngram;
  Unit unit;
  uint64_t seed;
};

// Seeded 64-bit hash of a byte string: h = key ^ len*G, then h = mix64(h ^ chunk) for each
// little-endian 8-byte chunk, the last one zero-padded (the length term keeps padding unambiguous).
uint64_t hash_bytes(const char* data, size_t len, uint64_t key);

// Python's str.isspace() for one code point (the separators of str.split()).
bool is_space(char32_t cp);

// True when the UTF-8 text holds at least one non-whitespace code point.
bool has_word(std::string_view text);

// Hashes of every shingle of a valid UTF-8 text, in text order, duplicates kept; `out` is overwritten.
// `scratch` is reused across calls to spare allocations (word shingles are joined into it).
void shingle_hashes(std::string_view text, const ShingleSpec& spec, std::vector<uint64_t>& out, std::string& scratch);

// Row-major [texts.size(), num_perm] signatures into `out`, threads over documents.
void signatures(const std::vector<std::string_view>& texts, const ShingleSpec& spec, int64_t num_perm, int threads,
                uint64_t* out);

// Pairs (i < j), sorted and unique, whose signatures agree on every row of at least one band;
// band b covers columns [b*rows, (b+1)*rows). Threads over bands.
std::vector<std::array<int64_t, 2>> candidate_pairs(const uint64_t* sig, int64_t n, int64_t num_perm, int64_t bands,
                                                    int64_t rows, int threads);

// Exact Jaccard similarity of the shingle-hash sets of each pair of texts into `out` [m].
void exact_jaccard(const std::vector<std::string_view>& texts, const ShingleSpec& spec, const int64_t* pairs, int64_t m,
                   int threads, double* out);

}  // namespace unlearn_fast::minhash
