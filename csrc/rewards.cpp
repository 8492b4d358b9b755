// CPU kernels of the temporal and spatial rewards (VisionCoach eqs. 5-8, 13-15) over the
// batched layouts of visioncoach/rewards/batched.py (ClaimBatch, GroundTruth).
//
// visioncoach.rewards.batched's tensor-op paths (temporal_rewards / spatial_rewards with
// backend "torch") are the specification, and reference.py behind them. On a CPU those run
// ~60 small tensor ops, each paying ~10 us of dispatch for a few microseconds of work; here
// one loop over the predicted times and one over the claims do the same float64 arithmetic:
//
//   temporal_reward_cpu  r_tmp per rollout [N] float64
//   spatial_reward_cpu   r_spa per rollout [N] float64 (object_aware, max or avg)
//   rouge_from_ids       rewards/rouge.py's ROUGE means from token ids [pairs] float64
//
// Same operations in the same order as the tensor path (per-rollout sums accumulate in index
// order, like index_add_), so results agree bit for bit except exp's last bit and the order
// of the small per-claim sums over objects (~1e-16). No -ffast-math: the comparisons (closed
// intervals, dt <= tau, first minimum) must be exact.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <limits>
#include <vector>

namespace visioncoach {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "rewards op: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "rewards op: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "rewards op: ", name, " must have ", dim, " dims, got ", t.sizes());
}

void check_index(int64_t v, int64_t size, const char* name) {
  TORCH_CHECK(v >= 0 && v < size, "rewards op: ", name, " holds ", v, ", outside [0, ", size, ")");
}

// sum / count per rollout; 0 where the count is 0 (batched._segment_mean).
at::Tensor means(const std::vector<double>& num, const std::vector<double>& den) {
  const int64_t n = static_cast<int64_t>(num.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) o[i] = den[i] > 0 ? num[i] / std::max(den[i], 1.0) : 0.0;
  return out;
}

// kernels.claim_iou.pairwise_iou, operation for operation, in float64.
inline double iou(const double* a, const double* b) {
  const double wa = a[2] - a[0], ha = a[3] - a[1];
  const double wb = b[2] - b[0], hb = b[3] - b[1];
  const double iw = std::max(std::min(a[2], b[2]) - std::max(a[0], b[0]), 0.0);
  const double ih = std::max(std::min(a[3], b[3]) - std::max(a[1], b[1]), 0.0);
  const double inter = iw * ih;
  const double uni = wa * ha + wb * hb - inter;
  const bool ok = wa > 0 && ha > 0 && wb > 0 && hb > 0 && uni > 0;
  return std::min(ok ? inter / uni : 0.0, 1.0);
}

at::Tensor temporal_reward_cpu(const at::Tensor& times_, const at::Tensor& time_rollout_,
                               const at::Tensor& rollout_record_, const at::Tensor& gt_times_,
                               const at::Tensor& time_mask_, const at::Tensor& segments_,
                               const at::Tensor& seg_mask_, int64_t n_rollouts, double sigma) {
  TORCH_CHECK(n_rollouts >= 0, "temporal_reward_cpu: n_rollouts must be >= 0, got ", n_rollouts);
  check(times_, "times", at::kFloat, 1);
  check(time_rollout_, "time_rollout", at::kLong, 1);
  check(rollout_record_, "rollout_record", at::kLong, 1);
  check(gt_times_, "gt_times", at::kFloat, 2);
  check(time_mask_, "time_mask", at::kBool, 2);
  check(segments_, "segments", at::kFloat, 3);
  check(seg_mask_, "seg_mask", at::kBool, 2);
  const int64_t m = times_.size(0), r = gt_times_.size(0);
  const int64_t t_max = gt_times_.size(1), s_max = segments_.size(1);
  TORCH_CHECK(time_rollout_.size(0) == m, "temporal_reward_cpu: times and time_rollout differ in length");
  TORCH_CHECK(rollout_record_.size(0) == n_rollouts,
              "temporal_reward_cpu: rollout_record has ", rollout_record_.size(0), " rows, not n_rollouts = ",
              n_rollouts);
  TORCH_CHECK(time_mask_.sizes() == gt_times_.sizes() && segments_.size(0) == r &&
                  segments_.size(2) == 2 && seg_mask_.size(0) == r && seg_mask_.size(1) == s_max,
              "temporal_reward_cpu: ground-truth shapes disagree");
  const at::Tensor times = times_.contiguous(), rollout_record = rollout_record_.contiguous(),
                   time_rollout = time_rollout_.contiguous(), gt_times = gt_times_.contiguous(),
                   time_mask = time_mask_.contiguous(), segments = segments_.contiguous(),
                   seg_mask = seg_mask_.contiguous();
  const float* pt = times.data_ptr<float>();
  const int64_t* precord = rollout_record.data_ptr<int64_t>();
  const int64_t* proll = time_rollout.data_ptr<int64_t>();
  const float* pg = gt_times.data_ptr<float>();
  const bool* pgm = time_mask.data_ptr<bool>();
  const float* ps = segments.data_ptr<float>();
  const bool* psm = seg_mask.data_ptr<bool>();

  std::vector<double> num(n_rollouts, 0.0), den(n_rollouts, 0.0);
  const double two_s2 = 2.0 * sigma * sigma;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t roll = proll[i];
    check_index(roll, n_rollouts, "time_rollout");
    const int64_t q = precord[roll];
    check_index(q, r, "rollout_record");
    const double t = pt[i];
    double dt = kInf;
    bool any_time = false;
    for (int64_t k = 0; k < t_max; ++k) {
      if (!pgm[q * t_max + k]) continue;
      any_time = true;
      dt = std::min(dt, std::abs(t - static_cast<double>(pg[q * t_max + k])));
    }
    bool inside = false;
    for (int64_t k = 0; k < s_max && !inside; ++k) {
      if (!psm[q * s_max + k]) continue;
      inside = static_cast<double>(ps[(q * s_max + k) * 2]) <= t &&
               t <= static_cast<double>(ps[(q * s_max + k) * 2 + 1]);
    }
    // All times of a rollout share its record, so "no T^gt" zeroes the whole rollout.
    const double r_m = !any_time ? 0.0 : inside ? 1.0 : std::exp(-(dt * dt) / two_s2);
    num[roll] += r_m;
    den[roll] += 1.0;
  }
  return means(num, den);
}

// mode: 0 object_aware, 1 max, 2 avg. match [U, G] bool: I(o_m, o) for the claims' name ids
// (claim_obj) against the ground truth's (obj_name); read only by object_aware.
at::Tensor spatial_reward_cpu(const at::Tensor& claim_t_, const at::Tensor& claim_rollout_,
                              const at::Tensor& rollout_record_, const at::Tensor& boxes_,
                              const at::Tensor& box_count_, const at::Tensor& claim_obj_,
                              const at::Tensor& frame_of_, const at::Tensor& frame_time_,
                              const at::Tensor& frame_boxes_, const at::Tensor& box_obj_,
                              const at::Tensor& obj_name_, const at::Tensor& obj_count_,
                              const at::Tensor& match_, int64_t n_rollouts, double tau,
                              int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2,
              "spatial_reward_cpu: mode must be 0 (object_aware), 1 (max) or 2 (avg), got ", mode);
  TORCH_CHECK(n_rollouts >= 0, "spatial_reward_cpu: n_rollouts must be >= 0, got ", n_rollouts);
  check(claim_t_, "claim_t", at::kFloat, 1);
  check(claim_rollout_, "claim_rollout", at::kLong, 1);
  check(rollout_record_, "rollout_record", at::kLong, 1);
  check(boxes_, "boxes", at::kFloat, 3);
  check(box_count_, "box_count", at::kLong, 1);
  check(claim_obj_, "claim_obj", at::kLong, 1);
  check(frame_of_, "frame_of", at::kLong, 2);
  check(frame_time_, "frame_time", at::kFloat, 1);
  check(frame_boxes_, "frame_boxes", at::kFloat, 3);
  check(box_obj_, "box_obj", at::kLong, 2);
  check(obj_name_, "obj_name", at::kLong, 2);
  check(obj_count_, "obj_count", at::kLong, 1);
  check(match_, "match", at::kBool, 2);
  const int64_t c_n = claim_t_.size(0), b_max = boxes_.size(1);
  const int64_t r_n = frame_of_.size(0), k_max = frame_of_.size(1);
  const int64_t k_n = frame_time_.size(0), p_max = frame_boxes_.size(1), o_max = obj_name_.size(1);
  TORCH_CHECK(rollout_record_.size(0) == n_rollouts,
              "spatial_reward_cpu: rollout_record has ", rollout_record_.size(0), " rows, not n_rollouts = ",
              n_rollouts);
  TORCH_CHECK(claim_rollout_.size(0) == c_n &&
                  boxes_.size(0) == c_n && boxes_.size(2) == 4 && box_count_.size(0) == c_n &&
                  claim_obj_.size(0) == c_n,
              "spatial_reward_cpu: claim tensors differ in length");
  TORCH_CHECK(frame_boxes_.size(0) == k_n && frame_boxes_.size(2) == 4 && box_obj_.size(0) == k_n &&
                  box_obj_.size(1) == p_max && obj_name_.size(0) == k_n && obj_count_.size(0) == k_n,
              "spatial_reward_cpu: ground-truth shapes disagree");
  TORCH_CHECK(k_n > 0, "spatial_reward_cpu: the ground truth has no key frame");
  // The nearest-frame scan reads frame_of[q, 0] even when no slot beats +inf.
  TORCH_CHECK(k_max > 0, "spatial_reward_cpu: frame_of has no key-frame slot");
  const at::Tensor claim_t = claim_t_.contiguous(), rollout_record = rollout_record_.contiguous(),
                   claim_rollout = claim_rollout_.contiguous(), boxes = boxes_.contiguous(),
                   box_count = box_count_.contiguous(), claim_obj = claim_obj_.contiguous(),
                   frame_of = frame_of_.contiguous(), frame_time = frame_time_.contiguous(),
                   frame_boxes = frame_boxes_.contiguous(), box_obj = box_obj_.contiguous(),
                   obj_name = obj_name_.contiguous(), obj_count = obj_count_.contiguous(),
                   match = match_.contiguous();
  const float* pt = claim_t.data_ptr<float>();
  const int64_t* precord = rollout_record.data_ptr<int64_t>();
  const int64_t* proll = claim_rollout.data_ptr<int64_t>();
  const float* pb = boxes.data_ptr<float>();
  const int64_t* pbc = box_count.data_ptr<int64_t>();
  const int64_t* pobj = claim_obj.data_ptr<int64_t>();
  const int64_t* pfo = frame_of.data_ptr<int64_t>();
  const float* pft = frame_time.data_ptr<float>();
  const float* pfb = frame_boxes.data_ptr<float>();
  const int64_t* pbo = box_obj.data_ptr<int64_t>();
  const int64_t* pon = obj_name.data_ptr<int64_t>();
  const int64_t* poc = obj_count.data_ptr<int64_t>();
  const bool* pm = match.data_ptr<bool>();
  const int64_t m_rows = match.size(0), m_cols = match.size(1);

  std::vector<double> num(n_rollouts, 0.0), den(n_rollouts, 0.0);
  std::vector<double> best_obj(o_max), box_obj_max(o_max + 1);
  std::vector<char> matched(o_max);
  for (int64_t c = 0; c < c_n; ++c) {
    const int64_t roll = proll[c];
    check_index(roll, n_rollouts, "claim_rollout");
    const int64_t q = precord[roll];
    check_index(q, r_n, "rollout_record");
    // Nearest annotated key frame, the first minimum (frames are time-sorted: the earlier
    // frame on ties); a record without one has dt = inf and frame 0 (gated off below).
    const double t = pt[c];
    double d_min = kInf;
    int64_t slot = 0;
    for (int64_t k = 0; k < k_max; ++k) {
      const int64_t f = pfo[q * k_max + k];
      if (f >= 0) check_index(f, k_n, "frame_of");
      const double d = std::abs(t - (f >= 0 ? static_cast<double>(pft[f]) : kInf));
      if (d < d_min) {
        d_min = d;
        slot = k;
      }
    }
    const int64_t frame = std::max<int64_t>(pfo[q * k_max + slot], 0);
    check_index(frame, k_n, "frame_of");
    const bool gate = d_min <= tau;
    const int64_t nb = pbc[c];
    TORCH_CHECK(nb >= 1 && nb <= b_max, "spatial_reward_cpu: box_count[", c, "] = ", nb,
                " outside [1, ", b_max, "]");
    // A claim outside the temporal gate scores 0 in every mode (object_aware leaves it out
    // of the mean, the others count it), and under object_aware so does one whose name
    // matches no object of the frame: their IoUs are never read, so they are not computed.
    if (!gate) {
      if (mode != 0) den[roll] += 1.0;
      continue;
    }
    int64_t n_match = 0;
    if (mode == 0) {
      const int64_t pred = pobj[c];
      for (int64_t o = 0; o < o_max; ++o) {
        const int64_t name = pon[frame * o_max + o];
        bool m = false;
        if (name >= 0) {
          check_index(pred, m_rows, "claim_obj");
          check_index(name, m_cols, "obj_name");
          m = pm[pred * m_cols + name];
        }
        matched[o] = m;
        n_match += m;
      }
      if (n_match == 0) continue;
    }

    // IoU maxima over the claim's boxes x the frame's GT boxes.
    std::fill(best_obj.begin(), best_obj.end(), 0.0);
    double score_max = 0.0, score_avg = 0.0;
    const double count = static_cast<double>(poc[frame]);
    for (int64_t b = 0; b < nb; ++b) {
      double a[4];
      for (int j = 0; j < 4; ++j) a[j] = pb[(c * b_max + b) * 4 + j];
      std::fill(box_obj_max.begin(), box_obj_max.end(), 0.0);
      double box_max = 0.0;
      for (int64_t p = 0; p < p_max; ++p) {
        double g[4];
        for (int j = 0; j < 4; ++j) g[j] = pfb[(frame * p_max + p) * 4 + j];
        const double v = iou(a, g);
        box_max = std::max(box_max, v);
        const int64_t o = pbo[frame * p_max + p];
        if (o >= 0) {
          check_index(o, o_max, "box_obj");
          box_obj_max[o] = std::max(box_obj_max[o], v);
        }
      }
      double sum = 0.0;
      for (int64_t o = 0; o < o_max; ++o) {
        sum += box_obj_max[o];
        best_obj[o] = std::max(best_obj[o], box_obj_max[o]);
      }
      score_max = std::max(score_max, box_max);
      score_avg = std::max(score_avg, sum / count);
    }

    if (mode == 0) {  // a valid claim (m in I): the mean over its matched objects
      double sum = 0.0;
      for (int64_t o = 0; o < o_max; ++o) {
        if (matched[o]) sum += best_obj[o];
      }
      num[roll] += sum / static_cast<double>(n_match);
      den[roll] += 1.0;
    } else {
      num[roll] += mode == 1 ? score_max : score_avg;
      den[roll] += 1.0;
    }
  }
  return means(num, den);
}

// rouge.rouge_batch's scores from token ids: for each pair the mean of the ROUGE-1, ROUGE-2
// and ROUGE-L F1 (rouge_score's formula: p = hits / max(count, 1), r likewise,
// 2 * p * r / (p + r), 0 where p + r == 0; integers counted exactly, the same float64
// operations in the same order as the numpy path). LCS by the bit-parallel algorithm
// (Hyyro 2004) over the shorter side, on 64-bit words with carries between them.
int64_t lcs_length(const int64_t* a, int64_t na, const int64_t* b, int64_t nb,
                   std::vector<std::pair<int64_t, int64_t>>& pos, std::vector<uint64_t>& masks,
                   std::vector<uint64_t>& v) {
  if (na > nb) {
    std::swap(a, b);
    std::swap(na, nb);
  }
  if (na == 0) return 0;
  const int64_t words = (na + 63) / 64;
  // Match masks of the distinct tokens of the short side: tokens sorted with their positions.
  pos.clear();
  for (int64_t j = 0; j < na; ++j) pos.emplace_back(a[j], j);
  std::sort(pos.begin(), pos.end());
  std::vector<int64_t> keys;
  keys.reserve(pos.size());
  masks.clear();
  for (const auto& [tok, j] : pos) {
    if (keys.empty() || keys.back() != tok) {
      keys.push_back(tok);
      masks.resize(masks.size() + words, 0);
    }
    masks[(keys.size() - 1) * words + j / 64] |= uint64_t{1} << (j % 64);
  }
  v.assign(words, ~uint64_t{0});
  const uint64_t top = na % 64 == 0 ? ~uint64_t{0} : (uint64_t{1} << (na % 64)) - 1;
  v[words - 1] = top;
  for (int64_t i = 0; i < nb; ++i) {
    const auto it = std::lower_bound(keys.begin(), keys.end(), b[i]);
    if (it == keys.end() || *it != b[i]) continue;
    const uint64_t* m = masks.data() + (it - keys.begin()) * words;
    // v = ((v + u) | (v - u)) masked, u = v & m, as multi-word integers
    uint64_t carry = 0, borrow = 0;
    for (int64_t w = 0; w < words; ++w) {
      const uint64_t vw = v[w], u = vw & m[w];
      const uint64_t sum = vw + u + carry;
      carry = (sum < vw || (carry && sum == vw)) ? 1 : 0;
      const uint64_t diff = vw - u - borrow;
      borrow = (vw < u || (borrow && vw == u)) ? 1 : 0;
      v[w] = sum | diff;
    }
    v[words - 1] &= top;
  }
  int64_t zeros_set = 0;
  for (int64_t w = 0; w < words; ++w) zeros_set += __builtin_popcountll(v[w]);
  return na - zeros_set;
}

// sum over distinct items of min(count in a, count in b): a and b sorted.
template <typename T>
int64_t multiset_overlap(const std::vector<T>& a, const std::vector<T>& b) {
  int64_t hits = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i] < b[j]) {
      ++i;
    } else if (b[j] < a[i]) {
      ++j;
    } else {
      ++hits;
      ++i;
      ++j;
    }
  }
  return hits;
}

inline double fmeasure(double hits, int64_t pred_count, int64_t tgt_count) {
  const double p = hits / static_cast<double>(std::max<int64_t>(pred_count, 1));
  const double r = hits / static_cast<double>(std::max<int64_t>(tgt_count, 1));
  const double denom = p + r;
  return denom > 0 ? 2 * p * r / denom : 0.0;
}

at::Tensor rouge_from_ids(const at::Tensor& pred_ids_, const at::Tensor& pred_len_,
                          const at::Tensor& tgt_ids_, const at::Tensor& tgt_len_) {
  check(pred_ids_, "pred_ids", at::kLong, 1);
  check(pred_len_, "pred_len", at::kLong, 1);
  check(tgt_ids_, "tgt_ids", at::kLong, 1);
  check(tgt_len_, "tgt_len", at::kLong, 1);
  const int64_t n = pred_len_.size(0);
  TORCH_CHECK(tgt_len_.size(0) == n, "rouge_from_ids: ", n, " prediction lengths but ",
              tgt_len_.size(0), " target lengths");
  const at::Tensor pred_ids = pred_ids_.contiguous(), pred_len = pred_len_.contiguous(),
                   tgt_ids = tgt_ids_.contiguous(), tgt_len = tgt_len_.contiguous();
  const int64_t* pp = pred_ids.data_ptr<int64_t>();
  const int64_t* pt = tgt_ids.data_ptr<int64_t>();
  const int64_t* lp = pred_len.data_ptr<int64_t>();
  const int64_t* lt = tgt_len.data_ptr<int64_t>();
  int64_t total_p = 0, total_t = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] >= 0 && lt[i] >= 0, "rouge_from_ids: negative length at pair ", i);
    // Checked: wrapped sums could equal the id lists' sizes and walk the reads past them.
    TORCH_CHECK(!__builtin_add_overflow(total_p, lp[i], &total_p) &&
                    !__builtin_add_overflow(total_t, lt[i], &total_t),
                "rouge_from_ids: the lengths overflow int64 at pair ", i);
  }
  TORCH_CHECK(total_p == pred_ids.size(0) && total_t == tgt_ids.size(0),
              "rouge_from_ids: the lengths sum to ", total_p, " and ", total_t, ", the id lists hold ",
              pred_ids.size(0), " and ", tgt_ids.size(0));

  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  std::vector<int64_t> sa, sb;
  std::vector<std::pair<int64_t, int64_t>> ba, bb, pos;
  std::vector<uint64_t> masks, v;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t na = lp[i], nb = lt[i];
    const int64_t* a = pp;
    const int64_t* b = pt;
    pp += na;
    pt += nb;
    sa.assign(a, a + na);
    sb.assign(b, b + nb);
    std::sort(sa.begin(), sa.end());
    std::sort(sb.begin(), sb.end());
    ba.clear();
    bb.clear();
    for (int64_t j = 0; j + 1 < na; ++j) ba.emplace_back(a[j], a[j + 1]);
    for (int64_t j = 0; j + 1 < nb; ++j) bb.emplace_back(b[j], b[j + 1]);
    std::sort(ba.begin(), ba.end());
    std::sort(bb.begin(), bb.end());
    const double f1 = fmeasure(static_cast<double>(multiset_overlap(sa, sb)), na, nb);
    const double f2 = fmeasure(static_cast<double>(multiset_overlap(ba, bb)),
                               std::max<int64_t>(na - 1, 0), std::max<int64_t>(nb - 1, 0));
    const double fl = fmeasure(static_cast<double>(lcs_length(a, na, b, nb, pos, masks, v)), na, nb);
    o[i] = (f1 + f2 + fl) / 3.0;
  }
  return out;
}

}  // namespace
}  // namespace visioncoach

TORCH_LIBRARY_FRAGMENT(visioncoach, m) {
  m.def(
      "temporal_reward_cpu(Tensor times, Tensor time_rollout, Tensor rollout_record, "
      "Tensor gt_times, Tensor time_mask, Tensor segments, Tensor seg_mask, int n_rollouts, "
      "float sigma) -> Tensor");
  m.def(
      "spatial_reward_cpu(Tensor claim_t, Tensor claim_rollout, Tensor rollout_record, "
      "Tensor boxes, Tensor box_count, Tensor claim_obj, Tensor frame_of, Tensor frame_time, "
      "Tensor frame_boxes, Tensor box_obj, Tensor obj_name, Tensor obj_count, Tensor match, "
      "int n_rollouts, float tau, int mode) -> Tensor");
  m.def("rouge_from_ids(Tensor pred_ids, Tensor pred_len, Tensor tgt_ids, Tensor tgt_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(visioncoach, CPU, m) {
  m.impl("temporal_reward_cpu", &visioncoach::temporal_reward_cpu);
  m.impl("spatial_reward_cpu", &visioncoach::spatial_reward_cpu);
  m.impl("rouge_from_ids", &visioncoach::rouge_from_ids);
}
