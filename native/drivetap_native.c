/* Linux calls Node's fs module lacks: fallocate (allocate, punch hole, zero range), lseek SEEK_DATA/SEEK_HOLE
 * and open file description (OFD) byte-range locks, which image locking uses (block/drivers/image-lock.ts).
 * Each function returns a non-negative result or -errno; the TypeScript side maps errno to BlockError.
 * Also CRC-32C (the journal's checksum): SSE4.2's crc32 instruction when the CPU has it, else tables, and
 * the two descriptor calls that hand a TLS connection to a worker thread (nbd/server/tls-worker.ts):
 * dup and socketpair, which Node exposes for neither sockets nor threads. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
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
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
