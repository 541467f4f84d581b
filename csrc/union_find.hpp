// Disjoint-set forest with path halving and union by size.
#pragma once
#include <cstdint>
#include <vector>

namespace unlearn_fast {

class UnionFind {
 public:
  explicit UnionFind(int64_t n);
  int64_t find(int64_t x);
  bool unite(int64_t a, int64_t b);
  // Component label of every element: the smallest element of its component.
  std::vector<int64_t> labels();

 private:
  std::vector<int64_t> parent_;
  std::vector<int64_t> size_;
};

}  // namespace unlearn_fast
