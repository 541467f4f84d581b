#include "minhash.hpp"

#include <algorithm>
#include <cstring>

#include "parallel.hpp"

// The permutation loop is most of the cost and vectorises well, but 64-bit lane multiplies only
// exist natively in AVX-512DQ: compile clones for x86-64-v4 and AVX2 and let the loader pick one
// at run time, so a build on one x86 machine still runs on any other.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define UF_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define UF_TARGET_CLONES
#endif

namespace unlearn_fast::minhash {
namespace {

uint64_t load_le64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

// Byte length of the UTF-8 sequence led by `lead` (the input is valid UTF-8: CPython produced it).
inline int utf8_length(unsigned char lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

inline char32_t utf8_decode(const unsigned char* p, int len) {
  switch (len) {
    case 1: return p[0];
    case 2: return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3: return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default: return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
  }
}

// Byte offsets [begin, end) of the whitespace-separated words, as str.split() finds them.
void split_words(std::string_view text, std::vector<std::array<size_t, 2>>& words) {
  words.clear();
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  size_t start = 0;
  bool in_word = false;
  for (size_t i = 0; i < text.size();) {
    const int len = utf8_length(p[i]);
    const bool space = is_space(utf8_decode(p + i, len));
    if (space && in_word) words.push_back({start, i});
    if (!space && !in_word) start = i;
    in_word = !space;
    i += len;
  }
  if (in_word) words.push_back({start, text.size()});
}

// out[k] = min over shingles x of mix64(x ^ keys[k]). Blocks of 32 permutations keep the running
// minima in vector registers while the shingles stream past.
UF_TARGET_CLONES void min_hash(const uint64_t* x, int64_t n, const uint64_t* keys, int64_t num_perm, uint64_t* out) {
  constexpr int64_t kBlock = 32;
  int64_t k0 = 0;
  for (; k0 + kBlock <= num_perm; k0 += kBlock) {
    uint64_t acc[kBlock], key[kBlock];
    for (int64_t k = 0; k < kBlock; ++k) {
      acc[k] = ~uint64_t{0};
      key[k] = keys[k0 + k];
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t xi = x[i];
      for (int64_t k = 0; k < kBlock; ++k) {
        const uint64_t h = mix64(xi ^ key[k]);
        acc[k] = h < acc[k] ? h : acc[k];
      }
    }
    for (int64_t k = 0; k < kBlock; ++k) out[k0 + k] = acc[k];
  }
  for (int64_t k = k0; k < num_perm; ++k) {
    uint64_t acc = ~uint64_t{0};
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t h = mix64(x[i] ^ keys[k]);
      acc = h < acc ? h : acc;
    }
    out[k] = acc;
  }
}

}  // namespace

namespace {

// hash_bytes, told that `avail` >= len bytes from `data` are readable: the last partial chunk is then
// one masked 8-byte load instead of a byte loop (shingles sit inside their text, so most can).
uint64_t hash_bytes_in(const char* data, size_t len, size_t avail, uint64_t key) {
  uint64_t h = key ^ (static_cast<uint64_t>(len) * kGolden);
  size_t i = 0;
  for (; i + 8 <= len; i += 8) h = mix64(h ^ load_le64(data + i));
  if (i < len) {
    const size_t rest = len - i;  // 1..7
    uint64_t tail = 0;
    if (avail - i >= 8) {
      tail = load_le64(data + i) & (~uint64_t{0} >> (64 - 8 * rest));
    } else {
      for (size_t j = 0; j < rest; ++j) tail |= static_cast<uint64_t>(static_cast<unsigned char>(data[i + j])) << (8 * j);
    }
    h = mix64(h ^ tail);
  }
  return h;
}

}  // namespace

uint64_t hash_bytes(const char* data, size_t len, uint64_t key) { return hash_bytes_in(data, len, len, key); }

bool is_space(char32_t cp) {
  if (cp < 0x80) return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20);
  switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

bool has_word(std::string_view text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    const int len = utf8_length(p[i]);
    if (!is_space(utf8_decode(p + i, len))) return true;
    i += len;
  }
  return false;
}

void shingle_hashes(std::string_view text, const ShingleSpec& spec, std::vector<uint64_t>& out, std::string& scratch) {
  out.clear();
  const uint64_t key = stream_key(spec.seed, 0);
  const auto n = static_cast<size_t>(spec.ngram);
  if (spec.unit == Unit::kChar) {
    // A shingle is n consecutive code points; its bytes are contiguous in the UTF-8 text.
    const auto* p = reinterpret_cast<const unsigned char*>(text.data());
    const size_t size = text.size();
    const bool ascii = std::all_of(p, p + size, [](unsigned char c) { return c < 0x80; });
    std::vector<size_t> starts;  // code point offsets, only needed beyond ASCII
    if (!ascii) {
      starts.reserve(size);
      for (size_t i = 0; i < size; i += utf8_length(p[i])) starts.push_back(i);
    }
    const size_t points = ascii ? size : starts.size();
    if (points < n) {
      out.push_back(hash_bytes(text.data(), size, key));
      return;
    }
    out.reserve(points - n + 1);
    for (size_t i = 0; i + n <= points; ++i) {
      const size_t begin = ascii ? i : starts[i];
      const size_t end = ascii ? i + n : (i + n < points ? starts[i + n] : size);
      out.push_back(hash_bytes_in(text.data() + begin, end - begin, size - begin, key));
    }
    return;
  }
  // Word shingles: n consecutive words joined by one ASCII space, whatever whitespace separated them.
  std::vector<std::array<size_t, 2>> words;
  split_words(text, words);
  if (words.empty()) return;
  const size_t count = words.size() < n ? 1 : words.size() - n + 1;
  const size_t width = std::min(n, words.size());
  out.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    scratch.clear();
    for (size_t w = i; w < i + width; ++w) {
      if (w > i) scratch.push_back(' ');
      scratch.append(text.data() + words[w][0], words[w][1] - words[w][0]);
    }
    out.push_back(hash_bytes(scratch.data(), scratch.size(), key));
  }
}

void signatures(const std::vector<std::string_view>& texts, const ShingleSpec& spec, int64_t num_perm, int threads,
                uint64_t* out) {
  std::vector<uint64_t> keys(num_perm);
  for (int64_t k = 0; k < num_perm; ++k) keys[k] = stream_key(spec.seed, static_cast<uint64_t>(k) + 1);
  parallel_for(static_cast<int64_t>(texts.size()), threads, 16, [&](int, int64_t begin, int64_t end) {
    std::vector<uint64_t> hashes;
    std::string scratch;
    for (int64_t d = begin; d < end; ++d) {
      shingle_hashes(texts[d], spec, hashes, scratch);
      min_hash(hashes.data(), static_cast<int64_t>(hashes.size()), keys.data(), num_perm, out + d * num_perm);
    }
  });
}

std::vector<std::array<int64_t, 2>> candidate_pairs(const uint64_t* sig, int64_t n, int64_t num_perm, int64_t bands,
                                                    int64_t rows, int threads) {
  std::vector<std::vector<std::array<int64_t, 2>>> per_band(bands);
  parallel_for(bands, threads, 1, [&](int, int64_t b_begin, int64_t b_end) {
    std::vector<std::pair<uint64_t, int64_t>> keyed(n);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t col = b * rows;
      for (int64_t d = 0; d < n; ++d) {
        uint64_t h = stream_key(static_cast<uint64_t>(b), 0);
        for (int64_t r = 0; r < rows; ++r) h = mix64(h ^ sig[d * num_perm + col + r]);
        keyed[d] = {h, d};
      }
      std::sort(keyed.begin(), keyed.end());
      auto& found = per_band[b];
      for (int64_t lo = 0; lo < n;) {
        int64_t hi = lo + 1;
        while (hi < n && keyed[hi].first == keyed[lo].first) ++hi;
        // Equal bucket keys almost always mean equal band rows; compare the rows to make it exact.
        for (int64_t a = lo; a < hi; ++a) {
          const uint64_t* ra = sig + keyed[a].second * num_perm + col;
          for (int64_t c = a + 1; c < hi; ++c) {
            const uint64_t* rc = sig + keyed[c].second * num_perm + col;
            if (std::memcmp(ra, rc, rows * sizeof(uint64_t)) == 0) found.push_back({keyed[a].second, keyed[c].second});
          }
        }
        lo = hi;
      }
    }
  });
  size_t total = 0;
  for (const auto& v : per_band) total += v.size();
  std::vector<std::array<int64_t, 2>> pairs;
  pairs.reserve(total);
  for (auto& v : per_band) {
    pairs.insert(pairs.end(), v.begin(), v.end());
    std::vector<std::array<int64_t, 2>>().swap(v);  // free as we go: near-duplicate-heavy corpora repeat pairs per band
  }
  std::sort(pairs.begin(), pairs.end());
  pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
  return pairs;
}

void exact_jaccard(const std::vector<std::string_view>& texts, const ShingleSpec& spec, const int64_t* pairs, int64_t m,
                   int threads, double* out) {
  // Shingle sets only for the documents the pairs name, each built once however many pairs use it.
  std::vector<int64_t> slot(texts.size(), -1);
  std::vector<int64_t> docs;
  for (int64_t k = 0; k < 2 * m; ++k) {
    if (slot[pairs[k]] < 0) {
      slot[pairs[k]] = static_cast<int64_t>(docs.size());
      docs.push_back(pairs[k]);
    }
  }
  std::vector<std::vector<uint64_t>> sets(docs.size());
  parallel_for(static_cast<int64_t>(docs.size()), threads, 16, [&](int, int64_t begin, int64_t end) {
    std::string scratch;
    for (int64_t s = begin; s < end; ++s) {
      auto& set = sets[s];
      shingle_hashes(texts[docs[s]], spec, set, scratch);
      std::sort(set.begin(), set.end());
      set.erase(std::unique(set.begin(), set.end()), set.end());
      set.shrink_to_fit();
    }
  });
  parallel_for(m, threads, 256, [&](int, int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto& a = sets[slot[pairs[2 * k]]];
      const auto& b = sets[slot[pairs[2 * k + 1]]];
      size_t i = 0, j = 0, common = 0;
      while (i < a.size() && j < b.size()) {
        if (a[i] < b[j]) {
          ++i;
        } else if (b[j] < a[i]) {
          ++j;
        } else {
          ++common, ++i, ++j;
        }
      }
      const size_t united = a.size() + b.size() - common;
      out[k] = united == 0 ? 1.0 : static_cast<double>(common) / static_cast<double>(united);
    }
  });
}

}  // namespace unlearn_fast::minhash
