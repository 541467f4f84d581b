// pybind11 entry point of unlearn_fast._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "union_find.hpp"

namespace py = pybind11;

namespace {

py::array_t<int64_t> connected_components(int64_t n, py::array_t<int64_t, py::array::c_style | py::array::forcecast> pairs) {
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  auto buf = pairs.request();
  if (!(buf.ndim == 2 && buf.shape[1] == 2) && !(buf.ndim == 1 && buf.shape[0] == 0)) {
    throw std::invalid_argument("pairs must have shape [M, 2]");
  }
  const int64_t m = buf.ndim == 2 ? buf.shape[0] : 0;
  const int64_t* p = static_cast<const int64_t*>(buf.ptr);
  for (int64_t k = 0; k < 2 * m; ++k) {
    if (p[k] < 0 || p[k] >= n) {
      throw std::invalid_argument("pair element " + std::to_string(p[k]) + " is outside [0, " + std::to_string(n) + ")");
    }
  }
  std::vector<int64_t> labels;
  {
    py::gil_scoped_release release;
    unlearn_fast::UnionFind uf(n);
    for (int64_t k = 0; k < m; ++k) uf.unite(p[2 * k], p[2 * k + 1]);
    labels = uf.labels();
  }
  py::array_t<int64_t> out(n);
  std::copy(labels.begin(), labels.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ hot loops of unlearn_fast (union-find now; MinHash-LSH to come).";
  m.def("connected_components", &connected_components, py::arg("n"), py::arg("pairs"),
        "Label each of n elements with the smallest element of its connected component, "
        "given undirected edges `pairs` [M, 2] (int64).");
}
