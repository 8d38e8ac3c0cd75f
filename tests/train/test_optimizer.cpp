// Optimizers, learning-rate schedules, gradient clipping / accumulation and the dynamic loss
// scaler, against values worked out by hand (Lion) or with the textbook formulas in double
// precision (AdamW), and the boundary steps of each schedule.
#include <cmath>
#include <limits>
#include <vector>

#include "catch.hpp"
#include "io/error_message.h"
#include "qinggeng/train/loss_scaler.h"
#include "qinggeng/train/optimizer.h"
#include "qinggeng/train/schedule.h"

namespace {

using qg::train::ClipResult;
using qg::train::DecayKind;
using qg::train::GradAccumulator;
using qg::train::LossScaler;
using qg::train::LossScalerConfig;
using qg::train::LrSchedule;
using qg::train::Optimizer;
using qg::train::OptimizerConfig;
using qg::train::ParamRef;

/// A parameter owning its buffers, for tests.
struct Param {
  std::vector<float> value, grad;
  ParamRef ref(const std::string& name, bool decay = true) {
    return {name, value.data(), grad.data(), value.size(), decay};
  }
};

Param make_param(std::vector<float> values) {
  Param p;
  p.grad.assign(values.size(), 0.0f);
  p.value = std::move(values);
  return p;
}

}  // namespace

TEST_CASE("Lion follows lion-pytorch: sign of the interpolation, decoupled decay, then moment") {
  // w: decayed; b: not decayed; its second element sees the moment outvote the gradient.
  Param w = make_param({1.0f, 0.5f}), b = make_param({1.0f, 0.0f});
  Optimizer opt(OptimizerConfig::lion(0.1f), {w.ref("w"), b.ref("b", false)});
  CHECK(opt.config().beta1 == 0.9f);
  CHECK(opt.config().beta2 == 0.99f);
  const float lr = 0.1f;

  w.grad = {0.5f, 0.0f};  // g = 0 with m = 0: sign 0, only the decay acts
  b.grad = {0.5f, 1.0f};
  opt.step(lr);
  // p = 1 * (1 - 0.01) - 0.1 * sign(0.05) = 0.89; m = 0.005
  CHECK(w.value[0] == Approx(0.89f).epsilon(1e-6));
  CHECK(w.value[1] == Approx(0.495f).epsilon(1e-6));
  CHECK(b.value[0] == Approx(0.9f).epsilon(1e-6));   // no decay
  CHECK(b.value[1] == Approx(-0.1f).epsilon(1e-6));  // m = 0.01

  w.grad = {-0.2f, 0.0f};
  b.grad = {0.5f, -0.05f};  // c = 0.9*0.01 + 0.1*(-0.05) = 0.004 > 0 though g < 0
  opt.step(lr);
  // c = 0.9*0.005 - 0.02 = -0.0155: p = 0.89*0.99 + 0.1 = 0.9811; m = 0.00295
  CHECK(w.value[0] == Approx(0.9811f).epsilon(1e-6));
  CHECK(b.value[1] == Approx(-0.2f).epsilon(1e-6));

  w.grad = {0.03f, 0.0f};
  opt.step(lr);
  // c = 0.9*0.00295 + 0.003 > 0: p = 0.9811*0.99 - 0.1
  CHECK(w.value[0] == Approx(0.871289f).epsilon(1e-6));
  CHECK(opt.steps() == 3);

  auto slots = opt.slots();
  REQUIRE(slots.size() == 2);
  CHECK(slots[0].name == "w.exp_avg");
  CHECK(slots[0].data[0] == Approx(0.0032205f).epsilon(1e-5));
}

TEST_CASE("AdamW matches the bias-corrected formulas with decoupled weight decay") {
  Param w = make_param({1.0f}), b = make_param({-2.0f});
  Optimizer opt(OptimizerConfig::adamw(0.01f), {w.ref("w"), b.ref("b", false)});
  CHECK(opt.config().beta2 == 0.999f);
  // Values of p_t = p*(1 - lr*wd) - lr*m_hat/(sqrt(v_hat) + eps), computed in double.
  const float w_grads[] = {0.5f, -0.2f, 0.03f};
  const float b_grads[] = {1.0f, 1.0f, -3.0f};
  const double w_expected[] = {0.899000002, 0.8635404181145108, 0.8324463492672164};
  const double b_expected[] = {-2.099999999, -2.199999997999999, -2.1751499787890434};
  for (int t = 0; t < 3; ++t) {
    w.grad[0] = w_grads[t];
    b.grad[0] = b_grads[t];
    opt.step(0.1f);
    INFO("step " << t + 1);
    CHECK(w.value[0] == Approx(w_expected[t]).epsilon(1e-6));
    CHECK(b.value[0] == Approx(b_expected[t]).epsilon(1e-6));
  }
  auto slots = opt.slots();
  REQUIRE(slots.size() == 4);
  CHECK(slots[1].name == "w.exp_avg_sq");
  CHECK(slots[1].data[0] == Approx(0.00029036025).epsilon(1e-4));  // beta2 is 0.999f
  CHECK(slots[2].name == "b.exp_avg");
}

TEST_CASE("Optimizer rejects bad parameters and hyper-parameters by name") {
  Param a = make_param({1.0f});
  using qg::test::error_message;
  CHECK_THAT(error_message([&] {
               Optimizer(OptimizerConfig::lion(), {a.ref("a"), a.ref("a")});
             }),
             QG_CONTAINS("parameter a is listed twice"));
  CHECK_THAT(error_message([&] { Optimizer(OptimizerConfig::lion(), {}); }),
             QG_CONTAINS("no parameters"));
  ParamRef null_grad = a.ref("x");
  null_grad.grad = nullptr;
  CHECK_THAT(error_message([&] { Optimizer(OptimizerConfig::lion(), {null_grad}); }),
             QG_CONTAINS("parameter x has no value or gradient"));
  OptimizerConfig bad = OptimizerConfig::adamw();
  bad.beta2 = 1.0f;
  CHECK_THAT(error_message([&] { Optimizer(bad, {a.ref("a")}); }), QG_CONTAINS("beta2"));
  bad = OptimizerConfig::lion(-1.0f);
  CHECK_THAT(error_message([&] { Optimizer(bad, {a.ref("a")}); }), QG_CONTAINS("weight_decay"));
  CHECK_THAT(error_message([] { qg::train::parse_optimizer_kind("sgd", "--optimizer"); }),
             QG_CONTAINS("--optimizer: unknown optimizer \"sgd\""));
  CHECK(qg::train::parse_optimizer_kind("adamw", "x") == qg::train::OptimizerKind::AdamW);
}

TEST_CASE("MedicalGPT-zh schedule: 5000 warmup steps, then linear to 0 at the total") {
  const LrSchedule s = LrSchedule::medicalgpt_zh(20000);
  s.validate();
  CHECK(s.lr(0) == 0.0);
  CHECK(s.lr(1) == Approx(1e-4 / 5000));
  CHECK(s.lr(2500) == Approx(5e-5));
  CHECK(s.lr(4999) == Approx(1e-4 * 4999 / 5000));
  CHECK(s.lr(5000) == Approx(1e-4));
  CHECK(s.lr(5001) == Approx(1e-4 * 14999 / 15000));
  CHECK(s.lr(12500) == Approx(5e-5));
  CHECK(s.lr(19999) == Approx(1e-4 / 15000));
  CHECK(s.lr(20000) == 0.0);
  CHECK(s.lr(30000) == 0.0);
  CHECK(s.lr(-5) == 0.0);
}

TEST_CASE("Cosine and constant schedules, linear without warmup, and validation") {
  LrSchedule cosine{2.0, 10, 110, DecayKind::Cosine, 0.1};
  cosine.validate();
  CHECK(cosine.lr(5) == Approx(1.0));
  CHECK(cosine.lr(10) == Approx(2.0));
  CHECK(cosine.lr(60) == Approx(2.0 * (0.1 + 0.9 * 0.5)));
  CHECK(cosine.lr(110) == Approx(0.2));
  CHECK(cosine.lr(500) == Approx(0.2));

  LrSchedule constant{1.0, 4, 0, DecayKind::Constant, 0.0};
  constant.validate();
  CHECK(constant.lr(2) == Approx(0.5));
  CHECK(constant.lr(4) == 1.0);
  CHECK(constant.lr(1000000000) == 1.0);

  LrSchedule linear{1.0, 0, 100, DecayKind::Linear, 0.0};
  CHECK(linear.lr(0) == 1.0);
  CHECK(linear.lr(50) == Approx(0.5));
  CHECK(linear.lr(100) == 0.0);

  using qg::test::error_message;
  LrSchedule bad = LrSchedule::medicalgpt_zh(5000);
  CHECK_THAT(error_message([&] { bad.validate(); }), QG_CONTAINS("total_steps (5000)"));
  bad = LrSchedule{1.0, 0, 10, DecayKind::Cosine, 1.5};
  CHECK_THAT(error_message([&] { bad.validate(); }), QG_CONTAINS("min_ratio"));
  CHECK_THAT(error_message([] { qg::train::parse_decay_kind("step", "--lr-schedule"); }),
             QG_CONTAINS("--lr-schedule: unknown schedule \"step\""));
  CHECK(qg::train::parse_decay_kind("cosine", "x") == DecayKind::Cosine);
}

TEST_CASE("clip_grad_norm scales to the max norm, reports the pre-clip norm and non-finite") {
  Param a = make_param({0, 0}), b = make_param({0});
  a.grad = {3.0f, 0.0f};
  b.grad = {4.0f};
  const std::vector<ParamRef> params = {a.ref("a"), b.ref("b")};

  SECTION("above the limit") {
    const ClipResult r = qg::train::clip_grad_norm(params, 1.0);
    CHECK(r.finite);
    CHECK(r.norm == Approx(5.0));
    CHECK(a.grad[0] == Approx(0.6f).epsilon(1e-5));
    CHECK(b.grad[0] == Approx(0.8f).epsilon(1e-5));
    CHECK(qg::train::clip_grad_norm(params, 0).norm == Approx(1.0).epsilon(1e-5));
  }
  SECTION("below the limit or measuring only: untouched") {
    CHECK(qg::train::clip_grad_norm(params, 10.0).norm == Approx(5.0));
    CHECK(qg::train::clip_grad_norm(params, 0.0).norm == Approx(5.0));
    CHECK(a.grad[0] == 3.0f);
    CHECK(b.grad[0] == 4.0f);
  }
  SECTION("inf or NaN is reported and nothing is scaled") {
    b.grad[0] = std::numeric_limits<float>::infinity();
    ClipResult r = qg::train::clip_grad_norm(params, 1.0);
    CHECK_FALSE(r.finite);
    CHECK(a.grad[0] == 3.0f);
    b.grad[0] = std::nanf("");
    r = qg::train::clip_grad_norm(params, 1.0);
    CHECK_FALSE(r.finite);
    CHECK(std::isnan(r.norm));
    CHECK(a.grad[0] == 3.0f);
  }
}

TEST_CASE("GradAccumulator averages k micro-batches that add into the gradients") {
  Param a = make_param({0, 0});
  const std::vector<ParamRef> params = {a.ref("a")};
  GradAccumulator acc(3);
  const float micro[3][2] = {{1, -3}, {2, 0}, {6, 9}};
  for (int round = 0; round < 2; ++round) {
    qg::train::zero_grads(params);
    for (int k = 0; k < 3; ++k) {
      a.grad[0] += micro[k][0];
      a.grad[1] += micro[k][1];
      CHECK(acc.add(params) == (k == 2));
    }
    CHECK(acc.pending() == 0);
    CHECK(a.grad[0] == 3.0f);
    CHECK(a.grad[1] == 2.0f);
  }
  CHECK_THAT(qg::test::error_message([] { GradAccumulator(0); }), QG_CONTAINS("micro_batches"));
}

TEST_CASE("LossScaler: 2^16 start, unscale, halve and skip on overflow, double after clean runs") {
  Param a = make_param({0, 0});
  const std::vector<ParamRef> params = {a.ref("a")};
  LossScaler scaler;
  CHECK(scaler.scale() == 65536.0f);

  a.grad = {0.5f * 65536.0f, -3.0f};
  CHECK(scaler.unscale(params));
  CHECK(a.grad[0] == 0.5f);
  CHECK(a.grad[1] == -3.0f / 65536.0f);

  a.grad = {std::numeric_limits<float>::infinity(), 1.0f};
  CHECK_FALSE(scaler.unscale(params));
  CHECK(a.grad[1] == 1.0f);  // left for the skipped step
  CHECK_FALSE(scaler.update(false));
  CHECK(scaler.scale() == 32768.0f);
  CHECK_FALSE(scaler.update(false));
  CHECK(scaler.scale() == 16384.0f);
  CHECK(scaler.state().skipped_steps == 2);

  for (int i = 0; i < 1999; ++i) REQUIRE(scaler.update(true));
  CHECK(scaler.scale() == 16384.0f);
  CHECK(scaler.update(true));  // the 2000th clean step
  CHECK(scaler.scale() == 32768.0f);
  CHECK(scaler.state().clean_steps == 0);
}

TEST_CASE("LossScaler: an overflow restarts the growth count; floor, ceiling, disabled") {
  LossScalerConfig c;
  c.growth_interval = 3;
  c.init_scale = 8.0f;
  c.min_scale = 2.0f;
  c.max_scale = 16.0f;
  LossScaler scaler(c);
  const bool outcomes[] = {true, true, false, true, true, true};
  const float scales[] = {8, 8, 4, 4, 4, 8};
  for (int i = 0; i < 6; ++i) {
    INFO("update " << i);
    CHECK(scaler.update(outcomes[i]) == outcomes[i]);
    CHECK(scaler.scale() == scales[i]);
  }
  for (int i = 0; i < 10; ++i) scaler.update(true);
  CHECK(scaler.scale() == 16.0f);
  for (int i = 0; i < 10; ++i) scaler.update(false);
  CHECK(scaler.scale() == 2.0f);

  LossScalerConfig off;
  off.enabled = false;
  LossScaler disabled(off);
  Param a = make_param({0});
  a.grad = {5.0f};
  CHECK(disabled.scale() == 1.0f);
  CHECK(disabled.unscale({a.ref("a")}));
  CHECK(a.grad[0] == 5.0f);
  CHECK_FALSE(disabled.update(false));  // a NaN step is skipped even without scaling
  CHECK(disabled.scale() == 1.0f);

  using qg::test::error_message;
  LossScalerConfig bad;
  bad.backoff_factor = 1.0f;
  CHECK_THAT(error_message([&] { LossScaler{bad}; }), QG_CONTAINS("backoff_factor"));
  bad = {};
  bad.growth_interval = 0;
  CHECK_THAT(error_message([&] { LossScaler{bad}; }), QG_CONTAINS("growth_interval"));
  CHECK_THAT(error_message([&] { scaler.set_state({-1.0f, 0, 0}); }), QG_CONTAINS("scale"));
}
