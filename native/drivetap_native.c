/* Linux calls Node's fs module lacks: fallocate (allocate, punch hole, zero range), lseek SEEK_DATA/SEEK_HOLE
 * and open file description (OFD) byte-range locks, which image locking uses (block/drivers/image-lock.ts).
 * Each function returns a non-negative result or -errno; the TypeScript side maps errno to BlockError.
 * Also CRC-32C (the journal's checksum): SSE4.2's crc32 instruction when the CPU has it, else tables;
 * an io_uring ring for the file driver's io_uring engine where the kernel headers have it; and the two
 * descriptor calls that hand a TLS connection to a worker thread (nbd/server/tls-worker.ts): dup and
 * socketpair, which Node exposes for neither sockets nor threads. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include "loop_poll.h"
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int64_t arg_i64(napi_env env, napi_value v) {
  int64_t out = 0;
  napi_get_value_int64(env, v, &out);
  return out;
}

static napi_value ret_i64(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

static napi_value do_fallocate(napi_env env, napi_callback_info info, int mode) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3) return ret_i64(env, -EINVAL);
  int fd = (int)arg_i64(env, argv[0]);
  int64_t off = arg_i64(env, argv[1]);
  int64_t len = arg_i64(env, argv[2]);
  int r = fallocate(fd, mode, off, len);
  return ret_i64(env, r == 0 ? 0 : -errno);
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
}

static napi_value zero_range(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
}

static napi_value allocate(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, 0);
}

static napi_value do_seek(napi_env env, napi_callback_info info, int whence) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2) return ret_i64(env, -EINVAL);
  int fd = (int)arg_i64(env, argv[0]);
  off_t r = lseek(fd, (off_t)arg_i64(env, argv[1]), whence);
  return ret_i64(env, r < 0 ? -errno : (int64_t)r);
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_HOLE); }

/* ---- OFD byte-range locks --------------------------------------------------------------------------------
 * Lock types cross the boundary as 0 = read (shared), 1 = write (exclusive), 2 = none, whatever the
 * platform's F_RDLCK/F_WRLCK/F_UNLCK values are. OFD locks belong to the open file description, not
 * the process: a second open() of the same file in this process conflicts with the first, and closing
 * one descriptor leaves the locks of the others alone. */

static short lock_type_from_js(int64_t t) {
  return t == 0 ? F_RDLCK : t == 1 ? F_WRLCK : F_UNLCK;
}

static int64_t lock_type_to_js(short t) {
  return t == F_RDLCK ? 0 : t == F_WRLCK ? 1 : 2;
}

static bool lock_args(napi_env env, napi_callback_info info, int *fd, struct flock *fl) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 4) return false;
  *fd = (int)arg_i64(env, argv[0]);
  memset(fl, 0, sizeof(*fl));
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)arg_i64(env, argv[1]);
  fl->l_len = (off_t)arg_i64(env, argv[2]);
  fl->l_type = lock_type_from_js(arg_i64(env, argv[3]));
  return true;
}

/* ofdSetLock(fd, start, length, type): F_OFD_SETLK, never waits; 0, or -EAGAIN when another
 * description holds a conflicting lock. Type 2 unlocks. */
static napi_value ofd_set_lock(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  if (!lock_args(env, info, &fd, &fl)) return ret_i64(env, -EINVAL);
  int r = fcntl(fd, F_OFD_SETLK, &fl);
  if (r == 0) return ret_i64(env, 0);
  /* POSIX allows EACCES for a conflict; callers test for one code. */
  return ret_i64(env, errno == EACCES ? -EAGAIN : -errno);
}

/* ofdTestLock(fd, start, length, type): F_OFD_GETLK; the type of a lock that would conflict with
 * taking `type` (0 or 1), 2 when none would, or -errno. Locks of this description never conflict. */
static napi_value ofd_test_lock(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  if (!lock_args(env, info, &fd, &fl)) return ret_i64(env, -EINVAL);
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return ret_i64(env, -errno);
  return ret_i64(env, lock_type_to_js(fl.l_type));
}


/* ---- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) ----------------------------------------------
 * crc32c(buffers, seed) continues the CRC `seed` (0 to start) over the buffers in order, so
 * crc32c([a, b]) == crc32c(b, crc32c(a)). The register is inverted on entry and exit, as usual. */

#define CRC32C_POLY 0x82F63B78u

/* Slicing-by-8 tables: table[0] is the byte-at-a-time table; table[k][n] is n's CRC advanced by k
 * more zero bytes, so eight input bytes take eight lookups and no loop-carried shifts. */
static uint32_t crc_table[8][256];
static bool crc_hardware = false;

static void crc_init_tables(void) {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
    crc_table[0][n] = c;
  }
  for (uint32_t n = 0; n < 256; n++)
    for (int t = 1; t < 8; t++) crc_table[t][n] = (crc_table[t - 1][n] >> 8) ^ crc_table[0][crc_table[t - 1][n] & 0xff];
}

/* `crc` is the inverted register; the caller inverts before and after. */
static uint32_t crc_update_table(uint32_t crc, const uint8_t *p, size_t n) {
  while (n > 0 && ((uintptr_t)p & 7) != 0) {
    crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    n--;
  }
  while (n >= 8) {
    uint32_t lo, hi;
    memcpy(&lo, p, 4); /* little-endian hosts only: the addon is built for x86-64 and arm64 Linux */
    memcpy(&hi, p + 4, 4);
    lo ^= crc;
    crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
          crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
          crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
  return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

/* The crc32 instruction takes 3 cycles but can start one per cycle, so the hardware path runs three
 * lanes of LANE_BYTES side by side and joins them: with R(r, X) the register after X from r, and
 * Z(r, n) = R(r, n zero bytes), R(r, A B C) = Z(R(r, A), |B|+|C|) ^ Z(R(0, B), |C|) ^ R(0, C). Z is
 * linear in r, so it is four table lookups (one per byte of r) for the two fixed distances. */
#define LANE_BYTES 256
static uint32_t crc_shift_lane[4][256];     /* Z(r, LANE_BYTES) */
static uint32_t crc_shift_2lanes[4][256];   /* Z(r, 2 * LANE_BYTES) */

static void crc_init_shift(uint32_t table[4][256], size_t zero_bytes) {
  uint32_t basis[32];
  for (int bit = 0; bit < 32; bit++) {
    uint32_t c = 1u << bit;
    for (size_t i = 0; i < zero_bytes; i++) c = (c >> 8) ^ crc_table[0][c & 0xff];
    basis[bit] = c;
  }
  for (int k = 0; k < 4; k++)
    for (uint32_t v = 0; v < 256; v++) {
      uint32_t c = 0;
      for (int j = 0; j < 8; j++)
        if (v & (1u << j)) c ^= basis[8 * k + j];
      table[k][v] = c;
    }
}

static uint32_t crc_shift(uint32_t table[4][256], uint32_t r) {
  return table[0][r & 0xff] ^ table[1][(r >> 8) & 0xff] ^ table[2][(r >> 16) & 0xff] ^ table[3][r >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t crc_update_sse42(uint32_t crc, const uint8_t *p, size_t n) {
  while (n > 0 && ((uintptr_t)p & 7) != 0) {
    crc = _mm_crc32_u8(crc, *p++);
    n--;
  }
  while (n >= 3 * LANE_BYTES) {
    uint64_t a = crc, b = 0, c = 0;
    for (size_t i = 0; i < LANE_BYTES; i += 8) {
      uint64_t wa, wb, wc;
      memcpy(&wa, p + i, 8);
      memcpy(&wb, p + LANE_BYTES + i, 8);
      memcpy(&wc, p + 2 * LANE_BYTES + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      c = _mm_crc32_u64(c, wc);
    }
    crc = crc_shift(crc_shift_2lanes, (uint32_t)a) ^ crc_shift(crc_shift_lane, (uint32_t)b) ^ (uint32_t)c;
    p += 3 * LANE_BYTES;
    n -= 3 * LANE_BYTES;
  }
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  crc = (uint32_t)c;
  while (n-- > 0) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}
#endif

typedef uint32_t (*crc_update_fn)(uint32_t crc, const uint8_t *p, size_t n);
static crc_update_fn crc_update = crc_update_table;

/* Adds one Uint8Array (a Buffer is one) to the register; false if `v` is not one. */
static bool crc_add_value(napi_env env, napi_value v, crc_update_fn update, uint32_t *crc) {
  bool is_typed = false;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed) return false;
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  if (napi_get_typedarray_info(env, v, &type, &length, &data, NULL, NULL) != napi_ok) return false;
  if (type != napi_uint8_array) return false;
  if (length > 0) *crc = update(*crc, (const uint8_t *)data, length);
  return true;
}

static napi_value crc32c_with(napi_env env, napi_callback_info info, crc_update_fn update) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t seed = 0;
  if (argc >= 2) {
    napi_valuetype t;
    napi_typeof(env, argv[1], &t);
    if (t != napi_undefined && napi_get_value_uint32(env, argv[1], &seed) != napi_ok) {
      napi_throw_type_error(env, NULL, "crc32c: seed must be a number");
      return NULL;
    }
  }
  uint32_t crc = ~seed;
  bool is_array = false;
  if (argc >= 1) napi_is_array(env, argv[0], &is_array);
  if (is_array) {
    uint32_t count = 0;
    napi_get_array_length(env, argv[0], &count);
    for (uint32_t i = 0; i < count; i++) {
      napi_value item;
      if (napi_get_element(env, argv[0], i, &item) != napi_ok || !crc_add_value(env, item, update, &crc)) {
        napi_throw_type_error(env, NULL, "crc32c: buffers must be Uint8Arrays");
        return NULL;
      }
    }
  } else if (argc < 1 || !crc_add_value(env, argv[0], update, &crc)) {
    napi_throw_type_error(env, NULL, "crc32c: expected a Buffer or an array of Buffers");
    return NULL;
  }
  napi_value out;
  napi_create_uint32(env, ~crc, &out);
  return out;
}

static napi_value crc32c(napi_env env, napi_callback_info info) { return crc32c_with(env, info, crc_update); }

/* The table path even on a CPU with SSE4.2, so tests can compare the two. */
static napi_value crc32c_software(napi_env env, napi_callback_info info) {
  return crc32c_with(env, info, crc_update_table);
}


/* ---- io_uring: one ring, driven from the event loop -----------------------------------------------------
 * The file driver's io_uring engine (block/drivers/io-engine/io-uring.ts) queues operations during an
 * event-loop turn and submits them with one io_uring_enter. Raw syscalls against <linux/io_uring.h>, no
 * SQPOLL thread: the kernel reads the submission queue only inside io_uring_enter, which is what lets
 * a failed submit take its unconsumed entries back. Completions are reaped by the event loop: the ring
 * signals an eventfd that a uv_poll_t watches, and its callback calls into JS, which reaps the
 * completion queue into a shared Int32Array of (tag, result) pairs. Buffers stay referenced on the JS
 * side until their completion; iovec arrays live here, one per submission slot, and are only needed
 * until the submit that consumes them (IORING_FEAT_SUBMIT_STABLE, which setup requires). */
/* DRIVETAP_NO_IO_URING builds without it, as where the headers are missing (to check that build). */
#if defined(__linux__) && defined(__has_include) && !defined(DRIVETAP_NO_IO_URING)
#if __has_include(<linux/io_uring.h>) && __has_include(<uv.h>)
#define DRIVETAP_IO_URING 1
#endif
#endif

#ifdef DRIVETAP_IO_URING
#include <linux/io_uring.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <uv.h>

/* An operation's buffers may be given as at most this many iovecs (Linux's UIO_MAXIOV). */
#define URING_IOV_MAX 1024

typedef struct uring {
  int ring_fd;
  int event_fd;
  unsigned sq_entries, cq_entries;
  unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
  struct io_uring_sqe *sqes;
  unsigned *cq_head, *cq_tail, *cq_mask;
  struct io_uring_cqe *cqes;
  void *sq_map, *cq_map;
  size_t sq_map_len, cq_map_len, sqes_len;
  unsigned tail;       /* our copy of the SQ tail: published before each enter */
  unsigned queued;     /* entries written since the last submit */
  unsigned inflight;   /* submitted, completion not reaped yet */
  struct iovec **slot_iov;
  unsigned *slot_iov_cap;
  uv_poll_t *poll;     /* freed by its close callback */
  bool referenced;
  napi_env env;
  napi_ref callback;
  napi_ref completions;
  napi_async_context async_context;
  /* counters for the bench and tests: io_uring_enter calls that submitted, and entries they took */
  double enters, submitted;
} uring_t;

static int sys_uring_setup(unsigned entries, struct io_uring_params *p) {
  return (int)syscall(__NR_io_uring_setup, entries, p);
}
static int sys_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}
static int sys_uring_register(int fd, unsigned op, void *arg, unsigned n) {
  return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

static void uring_unmap(uring_t *r) {
  if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_len);
  if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_len);
  if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_map_len);
  r->sqes = NULL;
  r->cq_map = r->sq_map = NULL;
  if (r->slot_iov) {
    for (unsigned i = 0; i < r->sq_entries; i++) free(r->slot_iov[i]);
    free(r->slot_iov);
    r->slot_iov = NULL;
  }
  free(r->slot_iov_cap);
  r->slot_iov_cap = NULL;
  if (r->event_fd >= 0) close(r->event_fd);
  if (r->ring_fd >= 0) close(r->ring_fd);
  r->event_fd = r->ring_fd = -1;
}

static int uring_reap_into(uring_t *r, int32_t *out, size_t pairs) {
  unsigned head = *r->cq_head;
  unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
  size_t n = 0;
  while (head != tail && n < pairs) {
    struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
    out[2 * n] = (int32_t)cqe->user_data;
    out[2 * n + 1] = cqe->res;
    n++;
    head++;
  }
  __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
  r->inflight -= (unsigned)n;
  return (int)n;
}

/* Sets up the ring and checks that it works: the ops the engine uses are supported and a NOP
 * completes. 0 or -errno; on failure nothing stays open. */
static int uring_setup(uring_t *r, unsigned entries) {
  struct io_uring_params p;
  memset(&p, 0, sizeof(p));
#ifdef IORING_SETUP_SUBMIT_ALL
  /* One bad entry does not stop the rest of the batch (its CQE carries the error). */
  p.flags = IORING_SETUP_SUBMIT_ALL;
#endif
  r->ring_fd = sys_uring_setup(entries, &p);
  if (r->ring_fd < 0 && errno == EINVAL && p.flags != 0) {
    memset(&p, 0, sizeof(p));
    r->ring_fd = sys_uring_setup(entries, &p);
  }
  if (r->ring_fd < 0) return -errno;
  int err = 0;
  /* NODROP: completions are never lost; SUBMIT_STABLE: iovecs are needed only until submit. */
  if (!(p.features & IORING_FEAT_NODROP) || !(p.features & IORING_FEAT_SUBMIT_STABLE)) {
    err = -ENOSYS;
    goto fail;
  }
  r->sq_entries = p.sq_entries;
  r->cq_entries = p.cq_entries;
  r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  if (p.features & IORING_FEAT_SINGLE_MMAP) {
    if (r->cq_map_len > r->sq_map_len) r->sq_map_len = r->cq_map_len;
    r->cq_map_len = r->sq_map_len;
  }
  r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->ring_fd,
                   IORING_OFF_SQ_RING);
  if (r->sq_map == MAP_FAILED) goto fail_errno;
  r->cq_map = (p.features & IORING_FEAT_SINGLE_MMAP)
                  ? r->sq_map
                  : mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->ring_fd,
                         IORING_OFF_CQ_RING);
  if (r->cq_map == MAP_FAILED) goto fail_errno;
  r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
  r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->ring_fd,
                 IORING_OFF_SQES);
  if (r->sqes == MAP_FAILED) goto fail_errno;
  char *sq = r->sq_map, *cq = r->cq_map;
  r->sq_head = (unsigned *)(sq + p.sq_off.head);
  r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
  r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
  r->sq_array = (unsigned *)(sq + p.sq_off.array);
  r->cq_head = (unsigned *)(cq + p.cq_off.head);
  r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
  r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  r->tail = *r->sq_tail;
  r->slot_iov = calloc(r->sq_entries, sizeof(struct iovec *));
  r->slot_iov_cap = calloc(r->sq_entries, sizeof(unsigned));
  if (!r->slot_iov || !r->slot_iov_cap) {
    err = -ENOMEM;
    goto fail;
  }

  /* The ops the engine uses must all be there (a kernel may have io_uring but not FALLOCATE). */
  size_t probe_len = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
  struct io_uring_probe *probe = calloc(1, probe_len);
  if (!probe) {
    err = -ENOMEM;
    goto fail;
  }
  if (sys_uring_register(r->ring_fd, IORING_REGISTER_PROBE, probe, 256) < 0) {
    err = -errno;
    free(probe);
    goto fail;
  }
  static const int needed[] = {IORING_OP_NOP, IORING_OP_READ, IORING_OP_WRITEV, IORING_OP_FSYNC,
                               IORING_OP_FALLOCATE};
  for (size_t i = 0; i < sizeof(needed) / sizeof(needed[0]); i++) {
    int op = needed[i];
    if (op > probe->last_op || !(probe->ops[op].flags & IO_URING_OP_SUPPORTED)) err = -EOPNOTSUPP;
  }
  free(probe);
  if (err) goto fail;

  /* A NOP round trip: a seccomp profile or a disabled sysctl shows up here, not on the first write. */
  struct io_uring_sqe *sqe = &r->sqes[r->tail & *r->sq_mask];
  memset(sqe, 0, sizeof(*sqe));
  sqe->opcode = IORING_OP_NOP;
  r->sq_array[r->tail & *r->sq_mask] = r->tail & *r->sq_mask;
  r->tail++;
  __atomic_store_n(r->sq_tail, r->tail, __ATOMIC_RELEASE);
  r->inflight = 1;
  if (sys_uring_enter(r->ring_fd, 1, 1, IORING_ENTER_GETEVENTS) != 1) {
    err = errno ? -errno : -EIO;
    goto fail;
  }
  int32_t pair[2];
  if (uring_reap_into(r, pair, 1) != 1 || pair[1] != 0) {
    err = -EIO;
    goto fail;
  }

  r->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (r->event_fd < 0) goto fail_errno;
  if (sys_uring_register(r->ring_fd, IORING_REGISTER_EVENTFD, &r->event_fd, 1) < 0) goto fail_errno;
  return 0;
fail_errno:
  err = -errno;
fail:
  uring_unmap(r);
  return err;
}

static uring_t *uring_arg(napi_env env, napi_value v) {
  uring_t *r = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external) return NULL;
  napi_get_value_external(env, v, (void **)&r);
  return r && r->ring_fd >= 0 ? r : NULL;
}

static void uring_poll_closed(uv_handle_t *h) { free(h); }

static void uring_set_referenced(uring_t *r, bool on) {
  if (r->referenced == on || !r->poll) return;
  r->referenced = on;
  if (on) uv_ref((uv_handle_t *)r->poll);
  else uv_unref((uv_handle_t *)r->poll);
}

/* The eventfd is readable: tell JS, which reaps. The loop stays alive only while ops are in flight. */
static void uring_on_poll(uv_poll_t *h, int status, int events) {
  (void)events;
  uring_t *r = h->data;
  uint64_t count;
  if (read(r->event_fd, &count, sizeof(count)) < 0 && errno != EAGAIN) status = -errno;
  napi_env env = r->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value cb, recv, arg;
  napi_get_reference_value(env, r->callback, &cb);
  napi_get_global(env, &recv); /* MakeCallback wants an object as receiver */
  napi_create_int32(env, status, &arg);
  if (napi_make_callback(env, r->async_context, recv, cb, 1, &arg, NULL) == napi_pending_exception) {
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    napi_fatal_exception(env, exc);
  }
  napi_close_handle_scope(env, scope);
}

/* uringCreate(entries, completions: Int32Array, onCompletions(status)) -> ring (an external) | -errno.
 * `completions` receives (tag, result) pairs from uringReap; the addon keeps a reference to it. */
static napi_value uring_create(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3) return ret_i64(env, -EINVAL);
  uring_t *r = calloc(1, sizeof(*r));
  if (!r) return ret_i64(env, -ENOMEM);
  r->ring_fd = r->event_fd = -1;
  int err = uring_setup(r, (unsigned)arg_i64(env, argv[0]));
  if (err) {
    free(r);
    return ret_i64(env, err);
  }
  uv_loop_t *loop = NULL;
  r->poll = calloc(1, sizeof(uv_poll_t));
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || !r->poll || uv_poll_init(loop, r->poll, r->event_fd) != 0) {
    free(r->poll);
    uring_unmap(r);
    free(r);
    return ret_i64(env, -EIO);
  }
  r->poll->data = r;
  uv_poll_start(r->poll, UV_READABLE, uring_on_poll);
  uv_unref((uv_handle_t *)r->poll);
  r->env = env;
  napi_create_reference(env, argv[1], 1, &r->completions);
  napi_create_reference(env, argv[2], 1, &r->callback);
  napi_value name;
  napi_create_string_utf8(env, "drivetap:io_uring", NAPI_AUTO_LENGTH, &name);
  napi_value resource;
  napi_create_object(env, &resource);
  napi_async_init(env, resource, name, &r->async_context);
  napi_value out;
  napi_create_external(env, r, NULL, NULL, &out);
  return out;
}

/* The next free submission entry, or NULL when the queue is full until the next submit. */
static struct io_uring_sqe *uring_next_sqe(uring_t *r, unsigned *slot) {
  /* Completions must never overflow the CQ: every submitted or queued entry needs a CQ slot. */
  if (r->tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= r->sq_entries) return NULL;
  if (r->inflight + r->queued >= r->cq_entries) return NULL;
  *slot = r->tail & *r->sq_mask;
  struct io_uring_sqe *sqe = &r->sqes[*slot];
  memset(sqe, 0, sizeof(*sqe));
  return sqe;
}

static void uring_commit_sqe(uring_t *r, unsigned slot) {
  r->sq_array[slot] = slot;
  r->tail++;
  r->queued++;
}

static bool buffer_arg(napi_env env, napi_value v, void **data, size_t *length) {
  bool is_typed = false;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed) return false;
  napi_typedarray_type type;
  return napi_get_typedarray_info(env, v, &type, length, data, NULL, NULL) == napi_ok && type == napi_uint8_array;
}

/* uringRead(ring, fd, buffer, position, tag) -> 0 | -EBUSY (queue full: submit first) | -errno */
static napi_value uring_read(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 5 ? uring_arg(env, argv[0]) : NULL;
  void *data;
  size_t length;
  if (!r || !buffer_arg(env, argv[2], &data, &length)) return ret_i64(env, -EINVAL);
  unsigned slot;
  struct io_uring_sqe *sqe = uring_next_sqe(r, &slot);
  if (!sqe) return ret_i64(env, -EBUSY);
  sqe->opcode = IORING_OP_READ;
  sqe->fd = (int)arg_i64(env, argv[1]);
  sqe->addr = (uint64_t)(uintptr_t)data;
  sqe->len = (uint32_t)length;
  sqe->off = (uint64_t)arg_i64(env, argv[3]);
  sqe->user_data = (uint64_t)(uint32_t)arg_i64(env, argv[4]);
  uring_commit_sqe(r, slot);
  return ret_i64(env, 0);
}

/* uringWritev(ring, fd, buffers[], position, tag) -> 0 | -EBUSY | -errno */
static napi_value uring_writev(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 5 ? uring_arg(env, argv[0]) : NULL;
  uint32_t count = 0;
  bool is_array = false;
  if (!r || napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array) return ret_i64(env, -EINVAL);
  napi_get_array_length(env, argv[2], &count);
  if (count == 0 || count > URING_IOV_MAX) return ret_i64(env, -EINVAL);
  unsigned slot;
  struct io_uring_sqe *sqe = uring_next_sqe(r, &slot);
  if (!sqe) return ret_i64(env, -EBUSY);
  if (r->slot_iov_cap[slot] < count) {
    unsigned cap = count < 8 ? 8 : count;
    struct iovec *iov = realloc(r->slot_iov[slot], cap * sizeof(struct iovec));
    if (!iov) return ret_i64(env, -ENOMEM);
    r->slot_iov[slot] = iov;
    r->slot_iov_cap[slot] = cap;
  }
  struct iovec *iov = r->slot_iov[slot];
  for (uint32_t i = 0; i < count; i++) {
    napi_value item;
    if (napi_get_element(env, argv[2], i, &item) != napi_ok ||
        !buffer_arg(env, item, &iov[i].iov_base, &iov[i].iov_len))
      return ret_i64(env, -EINVAL);
  }
  sqe->opcode = IORING_OP_WRITEV;
  sqe->fd = (int)arg_i64(env, argv[1]);
  sqe->addr = (uint64_t)(uintptr_t)iov;
  sqe->len = count;
  sqe->off = (uint64_t)arg_i64(env, argv[3]);
  sqe->user_data = (uint64_t)(uint32_t)arg_i64(env, argv[4]);
  uring_commit_sqe(r, slot);
  return ret_i64(env, 0);
}

/* uringFsync(ring, fd, datasync, tag) -> 0 | -EBUSY | -errno */
static napi_value uring_fsync(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 4 ? uring_arg(env, argv[0]) : NULL;
  if (!r) return ret_i64(env, -EINVAL);
  bool datasync = false;
  napi_get_value_bool(env, argv[2], &datasync);
  unsigned slot;
  struct io_uring_sqe *sqe = uring_next_sqe(r, &slot);
  if (!sqe) return ret_i64(env, -EBUSY);
  sqe->opcode = IORING_OP_FSYNC;
  sqe->fd = (int)arg_i64(env, argv[1]);
  sqe->fsync_flags = datasync ? IORING_FSYNC_DATASYNC : 0;
  sqe->user_data = (uint64_t)(uint32_t)arg_i64(env, argv[3]);
  uring_commit_sqe(r, slot);
  return ret_i64(env, 0);
}

/* uringFallocate(ring, fd, mode, offset, length, tag) -> 0 | -EBUSY | -errno; modes: fallocModes */
static napi_value uring_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 6 ? uring_arg(env, argv[0]) : NULL;
  if (!r) return ret_i64(env, -EINVAL);
  unsigned slot;
  struct io_uring_sqe *sqe = uring_next_sqe(r, &slot);
  if (!sqe) return ret_i64(env, -EBUSY);
  sqe->opcode = IORING_OP_FALLOCATE;
  sqe->fd = (int)arg_i64(env, argv[1]);
  sqe->len = (uint32_t)arg_i64(env, argv[2]); /* the mode travels in len */
  sqe->off = (uint64_t)arg_i64(env, argv[3]);
  sqe->addr = (uint64_t)arg_i64(env, argv[4]); /* and the length in addr */
  sqe->user_data = (uint64_t)(uint32_t)arg_i64(env, argv[5]);
  uring_commit_sqe(r, slot);
  return ret_i64(env, 0);
}

/* uringSubmit(ring) -> entries the kernel took, or -errno. Entries it did not take are taken back
 * (the kernel reads the queue only inside io_uring_enter), so the caller can route them elsewhere. */
static napi_value uring_submit(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 1 ? uring_arg(env, argv[0]) : NULL;
  if (!r) return ret_i64(env, -EINVAL);
  if (r->queued == 0) return ret_i64(env, 0);
  __atomic_store_n(r->sq_tail, r->tail, __ATOMIC_RELEASE);
  int n = sys_uring_enter(r->ring_fd, r->queued, 0, 0);
  int err = n < 0 ? -errno : 0;
  if (n < 0) n = 0;
  r->enters++;
  r->submitted += n;
  r->inflight += (unsigned)n;
  r->queued -= (unsigned)n;
  if (r->queued > 0) {
    /* Take back what the kernel did not consume. */
    r->tail -= r->queued;
    r->queued = 0;
    __atomic_store_n(r->sq_tail, r->tail, __ATOMIC_RELEASE);
  }
  uring_set_referenced(r, r->inflight > 0);
  return ret_i64(env, err ? err : n);
}

/* uringDiscardQueued(ring) -> how many queued, unsubmitted entries were dropped (a test's injected
 * submission failure takes them back as a failed enter would). */
static napi_value uring_discard_queued(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 1 ? uring_arg(env, argv[0]) : NULL;
  if (!r) return ret_i64(env, -EINVAL);
  unsigned n = r->queued;
  r->tail -= n;
  r->queued = 0;
  return ret_i64(env, n);
}

/* uringReap(ring) -> how many (tag, result) pairs were written to the completions array. When inflight
 * reaches 0 the eventfd is cleared here, saving the loop a wakeup for completions already reaped. */
static napi_value uring_reap(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 1 ? uring_arg(env, argv[0]) : NULL;
  if (!r) return ret_i64(env, -EINVAL);
  napi_value arr;
  napi_get_reference_value(env, r->completions, &arr);
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  if (napi_get_typedarray_info(env, arr, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_int32_array)
    return ret_i64(env, -EINVAL);
  int n = uring_reap_into(r, data, length / 2);
  if (r->inflight == 0) {
    uint64_t count;
    if (read(r->event_fd, &count, sizeof(count)) < 0) { /* EAGAIN: nothing was signalled */ }
  }
  uring_set_referenced(r, r->inflight > 0);
  return ret_i64(env, n);
}

/* uringStats(ring) -> [enters, entries submitted, in flight, sq entries, cq entries] */
static napi_value uring_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 1 ? uring_arg(env, argv[0]) : NULL;
  if (!r) return ret_i64(env, -EINVAL);
  double v[5] = {r->enters, r->submitted, r->inflight, r->sq_entries, r->cq_entries};
  napi_value out, item;
  napi_create_array_with_length(env, 5, &out);
  for (uint32_t i = 0; i < 5; i++) {
    napi_create_double(env, v[i], &item);
    napi_set_element(env, out, i, item);
  }
  return out;
}

/* uringClose(ring) -> 0 | -EBUSY while operations are in flight (the caller drains first). */
static napi_value uring_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uring_t *r = argc == 1 ? uring_arg(env, argv[0]) : NULL;
  if (!r) return ret_i64(env, -EINVAL);
  if (r->inflight > 0 || r->queued > 0) return ret_i64(env, -EBUSY);
  uv_poll_stop(r->poll);
  uv_close((uv_handle_t *)r->poll, uring_poll_closed);
  r->poll = NULL;
  uring_unmap(r);
  napi_delete_reference(env, r->callback);
  napi_delete_reference(env, r->completions);
  napi_async_destroy(env, r->async_context);
  /* The external keeps pointing here; uring_arg refuses a closed ring (ring_fd < 0). It is not freed:
   * one small struct per ring, and a process makes one ring. */
  return ret_i64(env, 0);
}
#endif /* DRIVETAP_IO_URING */

/* dupCloexec(fd): a second descriptor for fd's open file description (close-on-exec), or -errno. Closing
 * one of the two leaves the socket open for the other. */
static napi_value dup_cloexec(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd = fcntl((int)arg_i64(env, argv[0]), F_DUPFD_CLOEXEC, 0);
  return ret_i64(env, fd < 0 ? -errno : fd);
}

/* unixSocketPair(): [fd0, fd1] of a connected AF_UNIX stream pair (close-on-exec), or -errno. */
static napi_value unix_socket_pair(napi_env env, napi_callback_info info) {
  (void)info;
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return ret_i64(env, -errno);
  napi_value out;
  napi_create_array_with_length(env, 2, &out);
  napi_set_element(env, out, 0, ret_i64(env, fds[0]));
  napi_set_element(env, out, 1, ret_i64(env, fds[1]));
  return out;
}

static napi_value init(napi_env env, napi_value exports) {
  crc_init_tables();
#if defined(__x86_64__)
  __builtin_cpu_init();
  crc_hardware = __builtin_cpu_supports("sse4.2");
  if (crc_hardware) {
    crc_init_shift(crc_shift_lane, LANE_BYTES);
    crc_init_shift(crc_shift_2lanes, 2 * LANE_BYTES);
    crc_update = crc_update_sse42;
  }
#endif
  napi_value hardware;
  napi_get_boolean(env, crc_hardware, &hardware);
  napi_property_descriptor props[] = {
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL},
      {"allocate", NULL, allocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdSetLock", NULL, ofd_set_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdTestLock", NULL, ofd_test_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32c", NULL, crc32c, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32cSoftware", NULL, crc32c_software, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32cHardware", NULL, NULL, NULL, NULL, hardware, napi_enumerable, NULL},
      {"dupCloexec", NULL, dup_cloexec, NULL, NULL, NULL, napi_enumerable, NULL},
      {"unixSocketPair", NULL, unix_socket_pair, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  napi_value modes, v;
  napi_create_object(env, &modes);
  napi_create_int32(env, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, &v);
  napi_set_named_property(env, modes, "punchHole", v);
  napi_create_int32(env, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, &v);
  napi_set_named_property(env, modes, "zeroRange", v);
  napi_create_int32(env, 0, &v);
  napi_set_named_property(env, modes, "allocate", v);
  napi_set_named_property(env, exports, "fallocModes", modes);
#ifdef DRIVETAP_IO_URING
  napi_property_descriptor uring_props[] = {
      {"uringCreate", NULL, uring_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringRead", NULL, uring_read, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringWritev", NULL, uring_writev, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringFsync", NULL, uring_fsync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringFallocate", NULL, uring_fallocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringSubmit", NULL, uring_submit, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringDiscardQueued", NULL, uring_discard_queued, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringReap", NULL, uring_reap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringStats", NULL, uring_stats, NULL, NULL, NULL, napi_enumerable, NULL},
      {"uringClose", NULL, uring_close, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof(uring_props) / sizeof(uring_props[0]), uring_props);
#endif
  loop_poll_register(env, exports);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
