/* Adaptive polling of the event loop (the daemon's --poll-max-ns; daemon/loop-poll.ts).
 *
 * Before libuv blocks in epoll_wait, a uv_prepare_t callback polls the loop's epoll descriptor without
 * blocking for up to the current polling window. A request that arrives inside the window is seen
 * without the thread going to sleep, so the client's write does not have to wake a sleeping CPU: on a
 * virtual machine that wake (an inter-processor interrupt through the hypervisor) costs tens of
 * microseconds, more than the whole request. The window adapts the way QEMU's iothread polling does
 * (poll-max-ns, poll-grow, poll-shrink): a wait that ended within poll-max-ns grows it (from 4 µs,
 * times poll-grow), a longer wait shrinks it (divided by poll-shrink, or to 0), so an idle daemon does
 * not spin and a busy one, which always has an event ready, never needs to.
 *
 * How long the loop really slept comes from libuv's idle-time metric (time inside epoll_wait), which
 * Node turns on for every loop; without it the prepare/check pair would count the callbacks too. */
#define _GNU_SOURCE
#include "loop_poll.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>
#include <uv.h>

/* The window's first step when it grows from 0, as in QEMU. */
#define LOOP_POLL_START_NS 4000

typedef struct loop_poll {
  uv_loop_t *loop;
  uv_prepare_t prepare;
  uv_check_t check;
  bool initialised, running;
  int64_t max_ns, grow, shrink;
  int64_t window_ns;   /* the current window, 0..max_ns */
  uint64_t idle_before; /* uv_metrics_idle_time at the end of the prepare callback */
  bool hit;            /* the last spin saw an event */
  /* counters: spins, spins that saw an event, ns spent spinning, waits that slept */
  double spins, hits, spin_ns, sleeps;
} loop_poll_t;

/* One per process: the main thread's loop (workers do not poll). */
static loop_poll_t lp;

static napi_value lp_ret(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_prepare(uv_prepare_t *h) {
  loop_poll_t *p = h->data;
  p->hit = false;
  int timeout_ms = uv_backend_timeout(p->loop);
  if (timeout_ms != 0 && p->window_ns > 0) {
    int64_t window = p->window_ns;
    if (timeout_ms > 0 && (int64_t)timeout_ms * 1000000 < window) window = (int64_t)timeout_ms * 1000000;
    struct pollfd pfd = {.fd = uv_backend_fd(p->loop), .events = POLLIN, .revents = 0};
    int64_t t0 = now_ns(), t = t0;
    p->spins++;
    do {
      if (poll(&pfd, 1, 0) > 0) {
        p->hit = true;
        p->hits++;
        break;
      }
      /* Another task on this CPU (the client itself, on a small machine) runs first. */
      sched_yield();
      t = now_ns();
    } while (t - t0 < window);
    p->spin_ns += (double)(now_ns() - t0);
  }
  p->idle_before = uv_metrics_idle_time(p->loop);
}

static void on_check(uv_check_t *h) {
  loop_poll_t *p = h->data;
  if (p->hit) return; /* the window caught the event: it is right as it is */
  int64_t slept = (int64_t)(uv_metrics_idle_time(p->loop) - p->idle_before);
  if (slept <= 0) return; /* work was ready without waiting */
  p->sleeps++;
  if (slept > p->max_ns) {
    p->window_ns = p->shrink > 0 ? p->window_ns / p->shrink : 0;
  } else if (p->window_ns < p->max_ns) {
    int64_t next = p->window_ns == 0 ? LOOP_POLL_START_NS : p->window_ns * p->grow;
    p->window_ns = next > p->max_ns ? p->max_ns : next;
  }
}

static void loop_poll_cleanup(void *arg);

/* loopPollStart(maxNs, grow, shrink) -> 0 | -errno. Restarting changes the settings. */
static napi_value loop_poll_start(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t max_ns = 0, grow = 0, shrink = 0;
  if (argc < 3 || napi_get_value_int64(env, argv[0], &max_ns) != napi_ok ||
      napi_get_value_int64(env, argv[1], &grow) != napi_ok ||
      napi_get_value_int64(env, argv[2], &shrink) != napi_ok || max_ns < 0 || grow < 0 || shrink < 0)
    return lp_ret(env, -EINVAL);
  uv_loop_t *loop = NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) return lp_ret(env, -EINVAL);
  if (lp.initialised && lp.loop != loop) return lp_ret(env, -EBUSY);
  lp.max_ns = max_ns;
  lp.grow = grow < 2 ? 2 : grow;
  lp.shrink = shrink;
  if (lp.window_ns > max_ns) lp.window_ns = max_ns;
  if (!lp.initialised) {
    lp.loop = loop;
    uv_prepare_init(loop, &lp.prepare);
    uv_check_init(loop, &lp.check);
    lp.prepare.data = lp.check.data = &lp;
    /* Neither keeps the loop alive. */
    uv_unref((uv_handle_t *)&lp.prepare);
    uv_unref((uv_handle_t *)&lp.check);
    napi_add_env_cleanup_hook(env, loop_poll_cleanup, NULL);
    lp.initialised = true;
  }
  if (!lp.running) {
    lp.window_ns = 0;
    uv_prepare_start(&lp.prepare, on_prepare);
    uv_check_start(&lp.check, on_check);
    lp.running = true;
  }
  return lp_ret(env, 0);
}

/* loopPollStop(): polling ends; the handles stay, stopped, for a later start. */
static napi_value loop_poll_stop(napi_env env, napi_callback_info info) {
  (void)info;
  if (lp.running) {
    uv_prepare_stop(&lp.prepare);
    uv_check_stop(&lp.check);
    lp.running = false;
    lp.window_ns = 0;
  }
  return lp_ret(env, 0);
}

/* The environment is going away: the handles are closed so that the loop can close. */
static void loop_poll_cleanup(void *arg) {
  (void)arg;
  if (!lp.initialised) return;
  uv_close((uv_handle_t *)&lp.prepare, NULL);
  uv_close((uv_handle_t *)&lp.check, NULL);
  lp.initialised = lp.running = false;
}

/* loopPollStats() -> [spins, hits, spinNs, sleeps, windowNs, maxNs] */
static napi_value loop_poll_stats(napi_env env, napi_callback_info info) {
  (void)info;
  double v[] = {lp.spins, lp.hits, lp.spin_ns, lp.sleeps, (double)lp.window_ns, (double)lp.max_ns};
  napi_value out, x;
  napi_create_array_with_length(env, 6, &out);
  for (uint32_t i = 0; i < 6; i++) {
    napi_create_double(env, v[i], &x);
    napi_set_element(env, out, i, x);
  }
  return out;
}

void loop_poll_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"loopPollStart", NULL, loop_poll_start, NULL, NULL, NULL, napi_enumerable, NULL},
      {"loopPollStop", NULL, loop_poll_stop, NULL, NULL, NULL, napi_enumerable, NULL},
      {"loopPollStats", NULL, loop_poll_stats, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
}
