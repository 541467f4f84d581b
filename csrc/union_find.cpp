#include "union_find.hpp"

#include <numeric>

namespace unlearn_fast {

UnionFind::UnionFind(int64_t n) : parent_(n), size_(n, 1) {
  std::iota(parent_.begin(), parent_.end(), 0);
}

int64_t UnionFind::find(int64_t x) {
  while (parent_[x] != x) {
    parent_[x] = parent_[parent_[x]];
    x = parent_[x];
  }
  return x;
}

bool UnionFind::unite(int64_t a, int64_t b) {
  a = find(a);
  b = find(b);
  if (a == b) return false;
  if (size_[a] < size_[b]) std::swap(a, b);
  parent_[b] = a;
  size_[a] += size_[b];
  return true;
}

std::vector<int64_t> UnionFind::labels() {
  const int64_t n = static_cast<int64_t>(parent_.size());
  std::vector<int64_t> smallest(n, n);
  for (int64_t i = 0; i < n; ++i) {
    int64_t root = find(i);
    if (i < smallest[root]) smallest[root] = i;
  }
  std::vector<int64_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = smallest[find(i)];
  return out;
}

}  // namespace unlearn_fast
