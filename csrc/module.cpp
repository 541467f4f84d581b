// pybind11 entry point of unlearn_fast._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "minhash.hpp"
#include "parallel.hpp"
#include "union_find.hpp"

namespace py = pybind11;

namespace {

using PairArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// The number of rows of `pairs` [M, 2] (an empty 1-D array counts as M = 0), every element checked in [0, n).
int64_t checked_pairs(const PairArray& pairs, int64_t n) {
  const auto buf = pairs.request();
  if (!(buf.ndim == 2 && buf.shape[1] == 2) && !(buf.ndim == 1 && buf.shape[0] == 0)) {
    throw std::invalid_argument("pairs must have shape [M, 2]");
  }
  const int64_t m = buf.ndim == 2 ? buf.shape[0] : 0;
  const int64_t* p = pairs.data();
  for (int64_t k = 0; k < 2 * m; ++k) {
    if (p[k] < 0 || p[k] >= n) {
      throw std::invalid_argument("pair element " + std::to_string(p[k]) + " is outside [0, " + std::to_string(n) + ")");
    }
  }
  return m;
}

py::array_t<int64_t> connected_components(int64_t n, PairArray pairs) {
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  const int64_t m = checked_pairs(pairs, n);
  const int64_t* p = pairs.data();
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

namespace mh = unlearn_fast::minhash;

// UTF-8 views of the texts, checked under the GIL; `keep` holds references so that the views stay
// valid while the GIL is released, even if another thread empties the caller's list meanwhile.
std::vector<std::string_view> utf8_views(const py::list& texts, bool word, std::vector<py::object>& keep) {
  const auto n = static_cast<Py_ssize_t>(texts.size());
  if (n == 0) throw std::invalid_argument("texts is empty; give at least one text");
  std::vector<std::string_view> views;
  views.reserve(n);
  keep.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(texts.ptr(), i);
    const std::string where = "texts[" + std::to_string(i) + "]";
    if (!PyUnicode_Check(item)) throw std::invalid_argument(where + " must be a str, got " + Py_TYPE(item)->tp_name);
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(item, &size);
    if (data == nullptr) {
      PyErr_Clear();
      throw std::invalid_argument(where + " cannot be encoded as UTF-8 (it holds a lone surrogate)");
    }
    if (size == 0) throw std::invalid_argument(where + " is empty; every text needs at least one character");
    std::string_view view(data, static_cast<size_t>(size));
    if (word && !mh::has_word(view)) {
      throw std::invalid_argument(where + " holds only whitespace; unit='word' needs at least one word in every text");
    }
    keep.push_back(py::reinterpret_borrow<py::object>(item));
    views.push_back(view);
  }
  return views;
}

mh::ShingleSpec make_spec(int64_t ngram, uint64_t seed, bool word) {
  if (ngram < 1) throw std::invalid_argument("ngram=" + std::to_string(ngram) + " must be an int >= 1");
  return {ngram, word ? mh::Unit::kWord : mh::Unit::kChar, seed};
}

py::array_t<uint64_t> minhash_signatures(const py::list& texts, int64_t num_perm, int64_t ngram, uint64_t seed, bool word,
                                         int64_t num_threads) {
  if (num_perm < 1) throw std::invalid_argument("num_perm=" + std::to_string(num_perm) + " must be an int >= 1");
  const mh::ShingleSpec spec = make_spec(ngram, seed, word);
  std::vector<py::object> keep;
  const auto views = utf8_views(texts, word, keep);
  py::array_t<uint64_t> out({static_cast<py::ssize_t>(views.size()), static_cast<py::ssize_t>(num_perm)});
  uint64_t* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    mh::signatures(views, spec, num_perm, unlearn_fast::resolve_threads(num_threads), data);
  }
  return out;
}

py::array_t<int64_t> candidate_pairs(py::array_t<uint64_t, py::array::c_style | py::array::forcecast> signatures,
                                     int64_t bands, int64_t rows, int64_t num_threads) {
  auto buf = signatures.request();
  if (buf.ndim != 2) throw std::invalid_argument("signatures must have shape [N, num_perm]");
  const int64_t n = buf.shape[0], num_perm = buf.shape[1];
  if (bands < 1 || rows < 1 || bands * rows > num_perm) {
    throw std::invalid_argument("bands=" + std::to_string(bands) + ", rows=" + std::to_string(rows) +
                                " must be ints >= 1 with bands * rows <= num_perm=" + std::to_string(num_perm));
  }
  std::vector<std::array<int64_t, 2>> pairs;
  {
    py::gil_scoped_release release;
    pairs = mh::candidate_pairs(static_cast<const uint64_t*>(buf.ptr), n, num_perm, bands, rows,
                                unlearn_fast::resolve_threads(num_threads));
  }
  py::array_t<int64_t> out({static_cast<py::ssize_t>(pairs.size()), py::ssize_t{2}});
  if (!pairs.empty()) std::memcpy(out.mutable_data(), pairs.data(), pairs.size() * sizeof(pairs[0]));
  return out;
}

py::array_t<double> exact_jaccard(const py::list& texts, PairArray pairs,
                                  int64_t ngram, uint64_t seed, bool word, int64_t num_threads) {
  const mh::ShingleSpec spec = make_spec(ngram, seed, word);
  std::vector<py::object> keep;
  const auto views = utf8_views(texts, word, keep);
  const int64_t m = checked_pairs(pairs, static_cast<int64_t>(views.size()));
  const int64_t* p = pairs.data();
  py::array_t<double> out(m);
  double* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    mh::exact_jaccard(views, spec, p, m, unlearn_fast::resolve_threads(num_threads), data);
  }
  return out;
}

py::array_t<uint64_t> shingle_hashes(const py::str& text, int64_t ngram, uint64_t seed, bool word) {
  const mh::ShingleSpec spec = make_spec(ngram, seed, word);
  py::list one;
  one.append(text);
  std::vector<py::object> keep;
  const auto views = utf8_views(one, word, keep);
  std::vector<uint64_t> hashes;
  std::string scratch;
  mh::shingle_hashes(views[0], spec, hashes, scratch);
  py::array_t<uint64_t> out(static_cast<py::ssize_t>(hashes.size()));
  std::copy(hashes.begin(), hashes.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ hot loops of unlearn_fast: union-find, MinHash signatures, LSH banding, exact shingle Jaccard.";
  m.def("connected_components", &connected_components, py::arg("n"), py::arg("pairs"),
        "Label each of n elements with the smallest element of its connected component, "
        "given undirected edges `pairs` [M, 2] (int64).");
  // The MinHash functions below are the raw kernels; unlearn_fast.similarity.minhash validates and documents.
  m.def("minhash_signatures", &minhash_signatures, py::arg("texts"), py::arg("num_perm"), py::arg("ngram"), py::arg("seed"),
        py::arg("word"), py::arg("num_threads"),
        "MinHash signatures [N, num_perm] (uint64) of a list of str; num_threads 0 = all hardware threads.");
  m.def("candidate_pairs", &candidate_pairs, py::arg("signatures"), py::arg("bands"), py::arg("rows"), py::arg("num_threads"),
        "Sorted unique pairs (i < j) [M, 2] (int64) whose signatures agree on all rows of at least one band.");
  m.def("exact_jaccard", &exact_jaccard, py::arg("texts"), py::arg("pairs"), py::arg("ngram"), py::arg("seed"), py::arg("word"),
        py::arg("num_threads"), "Exact Jaccard similarity [M] (float64) of the shingle-hash sets of each pair of texts.");
  m.def("shingle_hashes", &shingle_hashes, py::arg("text"), py::arg("ngram"), py::arg("seed"), py::arg("word"),
        "The 64-bit hashes of one text's shingles, in text order, duplicates kept.");
}
