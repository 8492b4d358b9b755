// rewards.batched.ground_truth's packing in C++: one walk over the converted records
// (rewards.records.Record: gt_times, segments, frames[KeyFrame: time, names, boxes]) through
// the Python C API, filling GroundTruth's padded tensors directly. In Python the same walk is
// ~10 passes of generators over every record, frame, object and box (~0.6 ms for a
// 512-rollout batch, more once other work has evicted its caches); here ~30 us.
//
// batched.ground_truth stays the specification and the fallback: anything this walk does not
// expect (a field of another type, a segment that is not a pair, a box that is not four
// numbers, names and box lists of different lengths) raises, and the caller packs in Python.
#include <torch/extension.h>

#include <string>
#include <vector>

namespace py = pybind11;

namespace visioncoach {
namespace {

// A borrowed-items view of a list or tuple (PySequence_Fast), owning the sequence reference.
class Items {
 public:
  Items(PyObject* obj, const char* what) : seq_(PySequence_Fast(obj, what)) {
    if (seq_ == nullptr) throw py::error_already_set();
  }
  ~Items() { Py_DECREF(seq_); }
  Items(const Items&) = delete;
  Items& operator=(const Items&) = delete;
  Py_ssize_t size() const { return PySequence_Fast_GET_SIZE(seq_); }
  PyObject* operator[](Py_ssize_t i) const { return PySequence_Fast_GET_ITEM(seq_, i); }

 private:
  PyObject* seq_;
};

// obj.name, by an interned name (a lookup per record and per frame: creating the name's str
// each time, as PyObject_GetAttrString does, cost more than the rest of the walk).
py::object attr(PyObject* obj, PyObject* name) {
  PyObject* v = PyObject_GetAttr(obj, name);
  if (v == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(v);
}

PyObject* interned(const char* name) {
  PyObject* s = PyUnicode_InternFromString(name);
  if (s == nullptr) throw py::error_already_set();
  return s;  // kept for the life of the process
}

float as_f32(PyObject* v) {
  const double d = PyFloat_AsDouble(v);
  if (d == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<float>(d);  // np.fromiter(..., np.float32): the same C cast
}

// Returns (times, time_mask, segments, seg_mask, frame_of, frame_time, frame_boxes, box_obj,
// obj_name, obj_count, names): GroundTruth's fields, names normalised by `normalize`
// (grounding.normalize_name), called once per distinct name as written.
py::tuple pack_ground_truth(const py::sequence& records_seq, const py::function& normalize) {
  static PyObject* const kGtTimes = interned("gt_times");
  static PyObject* const kSegments = interned("segments");
  static PyObject* const kFrames = interned("frames");
  static PyObject* const kTime = interned("time");
  static PyObject* const kNames = interned("names");
  static PyObject* const kBoxes = interned("boxes");
  Items records(records_seq.ptr(), "records must be a sequence");
  const int64_t r_n = records.size();
  std::vector<float> times, segments, frame_time, boxes;
  std::vector<int64_t> n_times(r_n), n_segments(r_n), n_frames(r_n);
  std::vector<int64_t> obj_count, n_boxes, box_obj, obj_name;
  py::dict raw_ids, name_ids;  // name as written -> id; normalised name -> id
  py::list names;

  for (int64_t r = 0; r < r_n; ++r) {
    PyObject* rec = records[r];
    {
      py::object gt_times = attr(rec, kGtTimes);
      Items ts(gt_times.ptr(), "Record.gt_times must be a list");
      n_times[r] = ts.size();
      for (Py_ssize_t i = 0; i < ts.size(); ++i) times.push_back(as_f32(ts[i]));
    }
    {
      py::object segs = attr(rec, kSegments);
      Items ss(segs.ptr(), "Record.segments must be a list");
      n_segments[r] = ss.size();
      for (Py_ssize_t i = 0; i < ss.size(); ++i) {
        Items se(ss[i], "a segment must be a pair");
        if (se.size() != 2) throw py::value_error("a segment must be a pair");
        segments.push_back(as_f32(se[0]));
        segments.push_back(as_f32(se[1]));
      }
    }
    py::object frames_obj = attr(rec, kFrames);
    Items frames(frames_obj.ptr(), "Record.frames must be a list");
    n_frames[r] = frames.size();
    for (Py_ssize_t k = 0; k < frames.size(); ++k) {
      PyObject* kf = frames[k];
      frame_time.push_back(as_f32(attr(kf, kTime).ptr()));
      py::object names_obj = attr(kf, kNames), boxes_obj = attr(kf, kBoxes);
      Items fnames(names_obj.ptr(), "KeyFrame.names must be a list");
      Items fboxes(boxes_obj.ptr(), "KeyFrame.boxes must be a list");
      if (fnames.size() != fboxes.size()) throw py::value_error("KeyFrame.names and boxes differ in length");
      obj_count.push_back(fnames.size());
      int64_t count = 0;
      for (Py_ssize_t o = 0; o < fnames.size(); ++o) {
        py::handle raw(fnames[o]);
        PyObject* id = PyDict_GetItemWithError(raw_ids.ptr(), raw.ptr());
        if (id == nullptr) {
          if (PyErr_Occurred()) throw py::error_already_set();
          py::object norm = normalize(raw);
          py::int_ fresh(py::len(name_ids));
          PyObject* nid = PyDict_SetDefault(name_ids.ptr(), norm.ptr(), fresh.ptr());  // borrowed
          if (nid == nullptr || PyDict_SetItem(raw_ids.ptr(), raw.ptr(), nid) != 0)
            throw py::error_already_set();
          id = nid;
        }
        obj_name.push_back(PyLong_AsLongLong(id));
        Items obj_boxes(fboxes[o], "an object's boxes must be a list");
        for (Py_ssize_t b = 0; b < obj_boxes.size(); ++b) {
          Items box(obj_boxes[b], "a box must be 4 numbers");
          if (box.size() != 4) throw py::value_error("a box must be 4 numbers");
          for (int j = 0; j < 4; ++j) boxes.push_back(as_f32(box[j]));
          box_obj.push_back(o);
          ++count;
        }
      }
      n_boxes.push_back(count);
    }
  }
  for (const auto& item : name_ids) names.append(item.first);

  auto max_or_1 = [](const std::vector<int64_t>& v) {
    int64_t m = 0;
    for (int64_t x : v) m = std::max(m, x);
    return std::max<int64_t>(m, 1);
  };
  const int64_t k_n = static_cast<int64_t>(frame_time.size());
  const int64_t t_max = max_or_1(n_times), s_max = max_or_1(n_segments), k_max = max_or_1(n_frames);
  const int64_t p_max = max_or_1(n_boxes), o_max = max_or_1(obj_count);
  const auto f32 = at::TensorOptions().dtype(at::kFloat), i64 = at::TensorOptions().dtype(at::kLong),
             b8 = at::TensorOptions().dtype(at::kBool);
  at::Tensor t_times = at::zeros({r_n, t_max}, f32), t_mask = at::zeros({r_n, t_max}, b8);
  at::Tensor t_segs = at::zeros({r_n, s_max, 2}, f32), t_smask = at::zeros({r_n, s_max}, b8);
  at::Tensor t_frame_of = at::full({r_n, k_max}, -1, i64);
  at::Tensor t_frame_time = at::empty({k_n}, f32);
  at::Tensor t_boxes = at::zeros({k_n, p_max, 4}, f32), t_box_obj = at::full({k_n, p_max}, -1, i64);
  at::Tensor t_obj_name = at::full({k_n, o_max}, -1, i64), t_obj_count = at::empty({k_n}, i64);
  float* p_times = t_times.data_ptr<float>();
  bool* p_mask = t_mask.data_ptr<bool>();
  float* p_segs = t_segs.data_ptr<float>();
  bool* p_smask = t_smask.data_ptr<bool>();
  int64_t* p_frame_of = t_frame_of.data_ptr<int64_t>();
  size_t ti = 0, si = 0;
  int64_t frame = 0;
  for (int64_t r = 0; r < r_n; ++r) {
    for (int64_t i = 0; i < n_times[r]; ++i) {
      p_times[r * t_max + i] = times[ti++];
      p_mask[r * t_max + i] = true;
    }
    for (int64_t i = 0; i < n_segments[r]; ++i) {
      p_segs[(r * s_max + i) * 2] = segments[si++];
      p_segs[(r * s_max + i) * 2 + 1] = segments[si++];
      p_smask[r * s_max + i] = true;
    }
    for (int64_t i = 0; i < n_frames[r]; ++i) p_frame_of[r * k_max + i] = frame++;
  }
  std::copy(frame_time.begin(), frame_time.end(), t_frame_time.data_ptr<float>());
  std::copy(obj_count.begin(), obj_count.end(), t_obj_count.data_ptr<int64_t>());
  float* p_boxes = t_boxes.data_ptr<float>();
  int64_t* p_box_obj = t_box_obj.data_ptr<int64_t>();
  int64_t* p_obj_name = t_obj_name.data_ptr<int64_t>();
  size_t bi = 0, oi = 0;
  for (int64_t k = 0; k < k_n; ++k) {
    for (int64_t p = 0; p < n_boxes[k]; ++p, ++bi) {
      std::copy(boxes.begin() + 4 * bi, boxes.begin() + 4 * bi + 4, p_boxes + (k * p_max + p) * 4);
      p_box_obj[k * p_max + p] = box_obj[bi];
    }
    for (int64_t o = 0; o < obj_count[k]; ++o) p_obj_name[k * o_max + o] = obj_name[oi++];
  }
  return py::make_tuple(t_times, t_mask, t_segs, t_smask, t_frame_of, t_frame_time, t_boxes,
                        t_box_obj, t_obj_name, t_obj_count, names);
}

}  // namespace

void register_gt_pack(py::module& m) {
  m.def("pack_ground_truth", &pack_ground_truth, py::arg("records"), py::arg("normalize"),
        "rewards.batched.ground_truth's tensors (and normalised names) of converted records");
}

}  // namespace visioncoach
