/*
 * loadgen: a small, single-threaded epoll load generator for echo servers.
 *
 * Built by benchmarks/run.py with `cc -O2`; run it by hand as
 *
 *   loadgen --mode pingpong --port 9999 --conns 100 --size 64
 *
 * Modes (every message is --size bytes ending in '\n'):
 *
 *   pingpong  --conns TCP connections, each with exactly one message in
 *             flight: send it, read the whole echo back, send the next.
 *   connect   --conns concurrent slots, each looping: open a connection,
 *             send one message, read its echo, close.  Latency counts from
 *             the start of connect() to the last byte of the echo.
 *   udp       --conns client sockets, each with one datagram in flight.  A
 *             reply not back within --timeout-ms counts as lost and the
 *             client sends the next datagram; a late reply is ignored.
 *   idle      opens --conns connections, makes one round trip on each (so
 *             the server has surely accepted and is serving every one),
 *             prints a "ready" JSON line, then holds them until SIGTERM or
 *             SIGINT (or --duration seconds, so it always stops by itself)
 *             and prints a final JSON line saying how many are still open.
 *
 * With --idle-conns N, the pingpong and connect modes first open N more
 * connections, make one round trip on each and hold them idle while the
 * active ones are measured: the latency of a few busy clients among many
 * quiet ones.  The report then says how many of those are still open.
 *
 * The timed modes connect first, then run --warmup seconds unmeasured, then
 * measure for --duration seconds, and print one JSON line on stdout:
 * round trips per second, p50/p99/max latency in microseconds, error
 * counts, and the CPU this process used during the measured window as a
 * fraction of one core ("cpu_util"): near 1.0 means the load generator, not
 * the server, may be the bottleneck.
 *
 * Only the address given with --host is contacted (127.0.0.1 by default).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Events taken from the kernel per epoll_wait: enough that one call drains
 * a busy loop's worth of ready sockets at 1,000 connections. */
#define MAX_EVENTS 1024

/* Outstanding non-blocking connects while opening the initial connections:
 * opening thousands at once overflows small listen backlogs (a dropped SYN
 * costs a one-second retransmit), so open them in waves. */
#define MAX_PENDING_CONNECTS 256

/* Idle connections opened at a time: at most this many are opened and not
 * yet served (their one round trip not done), which keeps them within the
 * smallest listen backlog among the servers (asyncio's default, 100).
 * Opening more at once makes a slow server's accept queue overflow, and
 * each dropped SYN then waits out a retransmit timeout of one second or
 * more: 10,000 connections to asyncio took 21 s instead of 1.5. */
#define MAX_UNSERVED_IDLE 64

/* Read buffer: the echo's bytes are counted, never inspected (TCP), so one
 * shared buffer serves every connection. */
#define READ_BUFFER_SIZE (256 * 1024)

/* Latency histogram: log-linear, 64 sub-buckets per power of two, so any
 * reported percentile is within 1.6% of the true value, from 1 us to hours,
 * in 30 KiB. */
#define HIST_SUB_BITS 6
#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_BUCKETS ((64 - HIST_SUB_BITS) * HIST_SUB + 2 * HIST_SUB)

/* UDP datagrams carry their sequence number in this many hex digits at the
 * front, so a late reply is told apart from the one we wait for. */
#define SEQ_DIGITS 16

/* How often (ms) the UDP mode scans its clients for timed-out requests;
 * lost requests are thus detected --timeout-ms to --timeout-ms + this late. */
#define UDP_SCAN_MS 5

/* At the end of a timed run, how long round trips still in flight may take
 * to finish before the connections are closed regardless. */
#define DRAIN_MS 500

/* Seconds the initial connections may take before we give up. */
#define CONNECT_TIMEOUT_S 30.0

enum mode { MODE_PINGPONG, MODE_CONNECT, MODE_UDP, MODE_IDLE };

enum conn_state {
    ST_FREE,       /* no socket (connect mode, between connections) */
    ST_CONNECTING, /* non-blocking connect() under way */
    ST_SENDING,    /* part of the message still to send */
    ST_RECEIVING,  /* waiting for the rest of the echo */
    ST_IDLE,       /* idle mode: one round trip done, holding the connection */
};

struct conn {
    int fd;
    enum conn_state state;
    size_t sent;       /* bytes of the message sent */
    size_t received;   /* bytes of the echo received */
    uint64_t start_ns; /* when the current round trip started */
    uint64_t seq;      /* UDP: sequence number in flight */
    int retry;         /* connect mode: reopen when the loop comes round */
    int hold;          /* one round trip, then hold the connection idle */
};

struct options {
    enum mode mode;
    const char *host;
    int port;
    int conns;
    int idle_conns; /* pingpong/connect: idle connections held meanwhile */
    size_t size;
    double warmup_s;
    double duration_s;
    int timeout_ms;
};

struct stats {
    uint64_t round_trips;
    uint64_t errors;         /* connections reset/closed by the server, bad replies */
    uint64_t connect_errors; /* connect() failures (e.g. no free local port) */
    uint64_t lost;           /* UDP requests with no reply within the timeout */
    uint64_t late;           /* UDP replies that came after their timeout */
    uint64_t hist[HIST_BUCKETS];
};

static struct options opt = {
    .mode = MODE_PINGPONG,
    .host = "127.0.0.1",
    .port = 0,
    .conns = 1,
    .idle_conns = 0,
    .size = 64,
    .warmup_s = 1.0,
    .duration_s = 3.0,
    .timeout_ms = 200,
};

static struct stats st;
static struct sockaddr_in server_addr;
static int epfd;
static char *message;
static char read_buffer[READ_BUFFER_SIZE];
static volatile sig_atomic_t stop_requested;
/* Set once the measured window is over: round trips in flight finish, and
 * no new ones start. */
static int draining;
/* Connections waiting to be reopened (their `retry` is set). */
static int retries_pending;

/* The measured window, in CLOCK_MONOTONIC nanoseconds; 0 until known. */
static uint64_t window_start_ns, window_end_ns;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    /* One JSON line even on failure, so the runner can report it. */
    printf("{\"error\": \"%s: %s\"}\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* ---- latency histogram ---------------------------------------------- */

static int hist_index(uint64_t v) {
    if (v < 2 * HIST_SUB) return (int)v;
    int e = 63 - __builtin_clzll(v); /* floor(log2 v) >= HIST_SUB_BITS + 1 */
    int shift = e - HIST_SUB_BITS;
    return shift * HIST_SUB + (int)(v >> shift);
}

/* The middle of the values bucket i holds. */
static uint64_t hist_value(int i) {
    if (i < 2 * HIST_SUB) return (uint64_t)i;
    int shift = i / HIST_SUB - 1;
    uint64_t low = (uint64_t)(i - shift * HIST_SUB) << shift;
    return low + ((1ull << shift) - 1) / 2;
}

static void record(uint64_t start, uint64_t end) {
    if (end < window_start_ns || end > window_end_ns || window_start_ns == 0) return;
    st.round_trips++;
    st.hist[hist_index((end - start) / 1000)]++;
}

static uint64_t percentile(double p) {
    uint64_t total = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) total += st.hist[i];
    if (total == 0) return 0;
    uint64_t rank = (uint64_t)(p * (double)total + 0.999999);
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += st.hist[i];
        if (seen >= rank) return hist_value(i);
    }
    return 0;
}

static uint64_t max_latency(void) {
    for (int i = HIST_BUCKETS - 1; i >= 0; i--)
        if (st.hist[i]) return hist_value(i);
    return 0;
}

/* ---- sockets ---------------------------------------------------------- */

static void epoll_set(int op, struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void mark_retry(struct conn *c) {
    if (!c->retry) retries_pending++;
    c->retry = 1;
}

static void conn_close(struct conn *c) {
    if (c->fd >= 0) close(c->fd); /* close() also leaves the epoll set */
    c->fd = -1;
    c->state = ST_FREE;
}

static void conn_send(struct conn *c);

/* Start a non-blocking connect; returns 0, or -1 after counting an error. */
static int conn_open(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    /* In connect mode each connection writes once, so Nagle never holds
     * anything back: save the system call. */
    if (opt.mode != MODE_CONNECT) {
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    c->sent = c->received = 0;
    c->start_ns = now_ns();
    if (connect(c->fd, (struct sockaddr *)&server_addr, sizeof server_addr) < 0 &&
        errno != EINPROGRESS) {
        if (errno != EADDRNOTAVAIL && errno != ECONNREFUSED && errno != EAGAIN)
            die("connect");
        st.connect_errors++;
        conn_close(c);
        mark_retry(c);
        return -1;
    }
    if (opt.mode == MODE_CONNECT) {
        /* On loopback the handshake is usually done by the time connect()
         * returns, so send at once; if not, the send says EAGAIN and the
         * edge-triggered EPOLLOUT says when to try again. Watching both
         * directions edge-triggered from the start spares an epoll_ctl()
         * and an SO_ERROR check per connection: in this mode the client's
         * kernel work per connection is what limits the load generator. */
        epoll_set(EPOLL_CTL_ADD, c, EPOLLIN | EPOLLOUT | EPOLLET);
        c->state = ST_SENDING;
        conn_send(c);
        return 0;
    }
    c->state = ST_CONNECTING;
    epoll_set(EPOLL_CTL_ADD, c, EPOLLOUT);
    return 0;
}

/* Send what is left of the message; wait for writability if it does not fit. */
static void conn_send(struct conn *c) {
    while (c->sent < opt.size) {
        ssize_t n = send(c->fd, message + c->sent, opt.size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                if (c->state != ST_SENDING && opt.mode != MODE_CONNECT)
                    epoll_set(EPOLL_CTL_MOD, c, EPOLLIN | EPOLLOUT);
                c->state = ST_SENDING;
                return;
            }
            st.errors++;
            conn_close(c);
            mark_retry(c);
            return;
        }
        c->sent += (size_t)n;
    }
    if (c->state == ST_SENDING && opt.mode != MODE_CONNECT)
        epoll_set(EPOLL_CTL_MOD, c, EPOLLIN);
    c->state = ST_RECEIVING;
}

/* Begin a round trip on a connected socket. */
static void conn_start_round_trip(struct conn *c, uint64_t now) {
    c->sent = c->received = 0;
    if (opt.mode != MODE_CONNECT) c->start_ns = now;
    conn_send(c);
}

static void on_connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        st.connect_errors++;
        conn_close(c);
        mark_retry(c);
        return;
    }
    epoll_set(EPOLL_CTL_MOD, c, EPOLLIN);
    c->state = ST_RECEIVING; /* conn_send keeps it unless the send blocks */
    conn_start_round_trip(c, now_ns());
}

/* Read whatever the server has sent into the round trip's count. */
static void on_readable(struct conn *c) {
    for (;;) {
        ssize_t n = recv(c->fd, read_buffer, sizeof read_buffer, 0);
        if (n > 0) {
            c->received += (size_t)n;
            /* With one message in flight nothing more is due once the echo
             * is complete: skip the recv() that would only say EAGAIN. */
            if (c->received >= opt.size) return;
            continue;
        }
        if (n < 0 && errno == EAGAIN) return;
        /* End of stream or an error: the server dropped us. */
        st.errors++;
        conn_close(c);
        mark_retry(c);
        return;
    }
}

static void on_round_trip_done(struct conn *c, uint64_t now) {
    if (c->hold) {
        c->state = ST_IDLE; /* not measured: it only had to be served once */
        return;
    }
    record(c->start_ns, now);
    if (draining) {
        c->state = ST_IDLE; /* closed, cleanly, once the others are done */
        return;
    }
    switch (opt.mode) {
    case MODE_PINGPONG:
        conn_start_round_trip(c, now);
        break;
    case MODE_CONNECT:
        conn_close(c);
        conn_open(c);
        break;
    default:
        break;
    }
}

static void handle_tcp_event(struct conn *c, uint32_t events) {
    switch (c->state) {
    case ST_CONNECTING:
        on_connected(c);
        break;
    case ST_SENDING:
    case ST_RECEIVING:
        /* An echo server may send the first bytes back before a large
         * message is all sent, so read whatever arrives in either state. */
        if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
        if (c->state == ST_SENDING && (events & EPOLLOUT)) conn_send(c);
        if (c->state == ST_RECEIVING && c->received >= opt.size) {
            if (c->received > opt.size) st.errors++; /* more than we sent */
            on_round_trip_done(c, now_ns());
        }
        break;
    case ST_IDLE: {
        /* Data or a close from the server while idle: read it to see. */
        ssize_t n = recv(c->fd, read_buffer, sizeof read_buffer, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            st.errors++;
            conn_close(c);
        }
        break;
    }
    default:
        break;
    }
}

/* ---- TCP modes -------------------------------------------------------- */

/* Open the n connections (in waves of MAX_PENDING_CONNECTS) and let each
 * start its first round trip; return once all are connected. */
static void open_all(struct conn *conns, int n) {
    struct epoll_event events[MAX_EVENTS];
    int opened = 0, pending = 0;
    uint64_t give_up = now_ns() + (uint64_t)(CONNECT_TIMEOUT_S * 1e9);
    for (;;) {
        pending = 0;
        int connected = 0;
        for (int i = 0; i < opened; i++) {
            if (conns[i].state == ST_CONNECTING) pending++;
            else if (conns[i].state != ST_FREE) connected++;
            else if (conns[i].retry) {
                conns[i].retry = 0;
                if (conn_open(&conns[i]) == 0) pending++;
            }
        }
        while (opened < n && pending < MAX_PENDING_CONNECTS) {
            if (conn_open(&conns[opened++]) == 0) pending++;
        }
        if (connected == n) return;
        if (now_ns() > give_up) {
            errno = ETIMEDOUT;
            die("opening connections");
        }
        int got = epoll_wait(epfd, events, MAX_EVENTS, 10);
        for (int i = 0; i < got; i++) handle_tcp_event(events[i].data.ptr, events[i].events);
    }
}

/* Open n connections that each make one round trip and are then held idle
 * (ST_IDLE), MAX_UNSERVED_IDLE at a time; return them once the server has
 * served every one. */
static struct conn *open_idle(int n) {
    struct conn *conns = calloc((size_t)n, sizeof *conns);
    if (!conns) die("calloc");
    for (int i = 0; i < n; i++) {
        conns[i].fd = -1;
        conns[i].hold = 1;
    }
    struct epoll_event events[MAX_EVENTS];
    uint64_t give_up = now_ns() + (uint64_t)(CONNECT_TIMEOUT_S * 1e9);
    int opened = 0, first_unserved = 0;
    for (;;) {
        /* Connections before first_unserved are all idle: skip them. */
        while (first_unserved < opened && conns[first_unserved].state == ST_IDLE)
            first_unserved++;
        int unserved = 0;
        for (int i = first_unserved; i < opened; i++) {
            if (conns[i].state == ST_IDLE) continue;
            unserved++;
            if (conns[i].state == ST_FREE) {
                /* Refused or dropped by the server: try again. */
                conn_open(&conns[i]);
                conns[i].retry = 0;
            }
        }
        while (opened < n && unserved < MAX_UNSERVED_IDLE) {
            conn_open(&conns[opened++]);
            unserved++;
        }
        if (first_unserved == n) return conns;
        if (now_ns() > give_up) {
            errno = ETIMEDOUT;
            die("first round trip on every idle connection");
        }
        int got = epoll_wait(epfd, events, MAX_EVENTS, 10);
        for (int i = 0; i < got; i++) handle_tcp_event(events[i].data.ptr, events[i].events);
    }
}

/* How many of the n connections the server has not closed. */
static int count_open(struct conn *conns, int n) {
    int open = 0;
    for (int i = 0; i < n; i++) {
        if (conns[i].fd < 0) continue;
        ssize_t got = recv(conns[i].fd, read_buffer, 1, MSG_PEEK | MSG_DONTWAIT);
        if (got < 0 && errno == EAGAIN) open++;
    }
    return open;
}

/* Reopen every connection marked for retry; a reopened connection starts
 * its next round trip as soon as it is connected. */
static void reopen_dropped(struct conn *conns) {
    retries_pending = 0;
    for (int i = 0; i < opt.conns; i++) {
        if (conns[i].retry) {
            conns[i].retry = 0;
            conn_open(&conns[i]);
        }
    }
}

/* Let the round trips in flight finish, for at most DRAIN_MS, then close
 * every connection. A connection closed with its echo unread would reach
 * the server as a reset instead of an end of stream, and some servers log
 * a traceback for each reset. */
static void drain_and_close(struct conn *conns) {
    struct epoll_event events[MAX_EVENTS];
    uint64_t give_up = now_ns() + DRAIN_MS * 1000000u;
    draining = 1;
    for (;;) {
        int busy = 0;
        for (int i = 0; i < opt.conns; i++)
            if (conns[i].state != ST_IDLE && conns[i].state != ST_FREE) busy++;
        if (!busy || now_ns() > give_up) break;
        int n = epoll_wait(epfd, events, MAX_EVENTS, 10);
        for (int i = 0; i < n; i++) handle_tcp_event(events[i].data.ptr, events[i].events);
    }
    for (int i = 0; i < opt.conns; i++) conn_close(&conns[i]);
}

static void run_tcp(void) {
    struct conn *conns = calloc((size_t)opt.conns, sizeof *conns);
    if (!conns) die("calloc");
    for (int i = 0; i < opt.conns; i++) conns[i].fd = -1;
    struct epoll_event events[MAX_EVENTS];

    uint64_t idle_start = now_ns();
    struct conn *idle = opt.idle_conns ? open_idle(opt.idle_conns) : NULL;
    double idle_setup_s = (now_ns() - idle_start) / 1e9;

    if (opt.mode == MODE_PINGPONG) open_all(conns, opt.conns);
    uint64_t t0 = now_ns();
    window_start_ns = t0 + (uint64_t)(opt.warmup_s * 1e9);
    window_end_ns = window_start_ns + (uint64_t)(opt.duration_s * 1e9);
    if (opt.mode == MODE_CONNECT)
        for (int i = 0; i < opt.conns; i++) conn_open(&conns[i]);

    double cpu_start = -1, cpu_end = 0;
    for (;;) {
        uint64_t now = now_ns();
        if (cpu_start < 0 && now >= window_start_ns) cpu_start = cpu_seconds();
        if (now >= window_end_ns) break;
        /* A connect that failed for want of a local port is retried after
         * a short wait, which gives TIME_WAIT sockets a chance to clear. */
        int n = epoll_wait(epfd, events, MAX_EVENTS, retries_pending ? 1 : 10);
        for (int i = 0; i < n; i++) handle_tcp_event(events[i].data.ptr, events[i].events);
        if (retries_pending) reopen_dropped(conns);
    }
    cpu_end = cpu_seconds();
    drain_and_close(conns);
    int idle_open = 0;
    if (idle) {
        idle_open = count_open(idle, opt.idle_conns);
        for (int i = 0; i < opt.idle_conns; i++) conn_close(&idle[i]);
        free(idle);
    }
    free(conns);
    double window = opt.duration_s;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"size\": %zu, \"warmup_s\": %.3f, "
           "\"duration_s\": %.3f, \"round_trips\": %llu, \"rps\": %.1f, "
           "\"p50_us\": %llu, \"p99_us\": %llu, \"max_us\": %llu, \"errors\": %llu, "
           "\"connect_errors\": %llu, \"cpu_util\": %.3f, \"idle_conns\": %d, "
           "\"idle_open\": %d, \"idle_setup_s\": %.3f}\n",
           opt.mode == MODE_PINGPONG ? "pingpong" : "connect", opt.conns, opt.size,
           opt.warmup_s, opt.duration_s, (unsigned long long)st.round_trips,
           st.round_trips / window, (unsigned long long)percentile(0.50),
           (unsigned long long)percentile(0.99), (unsigned long long)max_latency(),
           (unsigned long long)st.errors, (unsigned long long)st.connect_errors,
           (cpu_end - (cpu_start < 0 ? cpu_end : cpu_start)) / window, opt.idle_conns,
           idle_open, idle_setup_s);
}

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static void run_idle(void) {
    struct epoll_event events[MAX_EVENTS];
    uint64_t t0 = now_ns();
    struct conn *conns = open_idle(opt.conns);
    printf("{\"mode\": \"idle\", \"phase\": \"ready\", \"conns\": %d, \"open\": %d, "
           "\"setup_s\": %.3f, \"errors\": %llu, \"connect_errors\": %llu}\n",
           opt.conns, opt.conns, (now_ns() - t0) / 1e9, (unsigned long long)st.errors,
           (unsigned long long)st.connect_errors);
    fflush(stdout);

    /* Hold them, noticing any the server closes, until told to stop. */
    uint64_t hold_until = now_ns() + (uint64_t)(opt.duration_s * 1e9);
    while (!stop_requested && now_ns() < hold_until) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, 100);
        for (int i = 0; i < n; i++) handle_tcp_event(events[i].data.ptr, events[i].events);
    }
    int open = count_open(conns, opt.conns);
    printf("{\"mode\": \"idle\", \"phase\": \"done\", \"conns\": %d, \"open\": %d, "
           "\"errors\": %llu}\n",
           opt.conns, open, (unsigned long long)st.errors);
}

/* ---- UDP mode --------------------------------------------------------- */

static void udp_send(struct conn *c, uint64_t now) {
    c->seq++;
    char digits[SEQ_DIGITS + 1];
    snprintf(digits, sizeof digits, "%016llx", (unsigned long long)c->seq);
    memcpy(message, digits, SEQ_DIGITS);
    c->start_ns = now;
    if (send(c->fd, message, opt.size, 0) < 0 && errno != EAGAIN && errno != ECONNREFUSED)
        die("send");
}

static void run_udp(void) {
    if (opt.size < SEQ_DIGITS + 1) {
        errno = EINVAL;
        die("--size must be at least 17 in udp mode");
    }
    struct conn *clients = calloc((size_t)opt.conns, sizeof *clients);
    if (!clients) die("calloc");
    uint64_t timeout_ns = (uint64_t)opt.timeout_ms * 1000000u;
    struct epoll_event events[MAX_EVENTS];
    char expected[SEQ_DIGITS + 1];

    uint64_t t0 = now_ns();
    window_start_ns = t0 + (uint64_t)(opt.warmup_s * 1e9);
    window_end_ns = window_start_ns + (uint64_t)(opt.duration_s * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &clients[i];
        c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket");
        /* connect(): replies from anyone but the server are filtered out. */
        if (connect(c->fd, (struct sockaddr *)&server_addr, sizeof server_addr) < 0)
            die("connect");
        epoll_set(EPOLL_CTL_ADD, c, EPOLLIN);
        udp_send(c, now_ns());
    }

    double cpu_start = -1, cpu_end;
    uint64_t last_scan = now_ns();
    for (;;) {
        uint64_t now = now_ns();
        if (cpu_start < 0 && now >= window_start_ns) cpu_start = cpu_seconds();
        if (now >= window_end_ns) break;
        int n = epoll_wait(epfd, events, MAX_EVENTS, UDP_SCAN_MS);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            for (;;) {
                ssize_t got = recv(c->fd, read_buffer, sizeof read_buffer, 0);
                if (got < 0) {
                    if (errno == EAGAIN) break;
                    st.errors++; /* ECONNREFUSED: nobody listening (yet) */
                    break;
                }
                snprintf(expected, sizeof expected, "%016llx", (unsigned long long)c->seq);
                if ((size_t)got != opt.size || memcmp(read_buffer, expected, SEQ_DIGITS)) {
                    st.late++; /* a reply to a request already counted lost */
                    continue;
                }
                record(c->start_ns, now);
                udp_send(c, now);
            }
        }
        if (now - last_scan >= UDP_SCAN_MS * 1000000u) {
            last_scan = now;
            for (int i = 0; i < opt.conns; i++) {
                if (now - clients[i].start_ns >= timeout_ns) {
                    if (now >= window_start_ns) st.lost++;
                    udp_send(&clients[i], now);
                }
            }
        }
    }
    cpu_end = cpu_seconds();
    printf("{\"mode\": \"udp\", \"conns\": %d, \"size\": %zu, \"warmup_s\": %.3f, "
           "\"duration_s\": %.3f, \"round_trips\": %llu, \"rps\": %.1f, "
           "\"p50_us\": %llu, \"p99_us\": %llu, \"max_us\": %llu, \"errors\": %llu, "
           "\"lost\": %llu, \"late\": %llu, \"timeout_ms\": %d, \"cpu_util\": %.3f}\n",
           opt.conns, opt.size, opt.warmup_s, opt.duration_s,
           (unsigned long long)st.round_trips, st.round_trips / opt.duration_s,
           (unsigned long long)percentile(0.50), (unsigned long long)percentile(0.99),
           (unsigned long long)max_latency(), (unsigned long long)st.errors,
           (unsigned long long)st.lost, (unsigned long long)st.late, opt.timeout_ms,
           (cpu_end - (cpu_start < 0 ? cpu_end : cpu_start)) / opt.duration_s);
}

/* ---- main ------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --mode pingpong|connect|udp|idle --port PORT [--host IP]\n"
            "               [--conns N] [--size BYTES] [--warmup S] [--duration S]\n"
            "               [--timeout-ms MS] [--idle-conns N]\n");
    exit(2);
}

/* Room for every idle connection plus a few: the hard limit is the bound. */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {
        {"mode", required_argument, 0, 'm'},     {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},     {"conns", required_argument, 0, 'c'},
        {"size", required_argument, 0, 's'},     {"warmup", required_argument, 0, 'w'},
        {"duration", required_argument, 0, 'd'}, {"timeout-ms", required_argument, 0, 't'},
        {"idle-conns", required_argument, 0, 'i'}, {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            if (!strcmp(optarg, "pingpong")) opt.mode = MODE_PINGPONG;
            else if (!strcmp(optarg, "connect")) opt.mode = MODE_CONNECT;
            else if (!strcmp(optarg, "udp")) opt.mode = MODE_UDP;
            else if (!strcmp(optarg, "idle")) opt.mode = MODE_IDLE;
            else usage();
            break;
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'c': opt.conns = atoi(optarg); break;
        case 's': opt.size = (size_t)atol(optarg); break;
        case 'w': opt.warmup_s = atof(optarg); break;
        case 'd': opt.duration_s = atof(optarg); break;
        case 't': opt.timeout_ms = atoi(optarg); break;
        case 'i': opt.idle_conns = atoi(optarg); break;
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.port > 65535 || opt.conns < 1 || opt.size < 1 ||
        opt.duration_s <= 0 || opt.warmup_s < 0 || opt.idle_conns < 0 ||
        (opt.idle_conns && opt.mode != MODE_PINGPONG && opt.mode != MODE_CONNECT))
        usage();

    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &server_addr.sin_addr) != 1) usage();

    raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    message = malloc(opt.size);
    if (!message) die("malloc");
    memset(message, 'x', opt.size);
    message[opt.size - 1] = '\n';

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    switch (opt.mode) {
    case MODE_PINGPONG:
    case MODE_CONNECT:
        run_tcp();
        break;
    case MODE_UDP:
        run_udp();
        break;
    case MODE_IDLE:
        run_idle();
        break;
    }
    fflush(stdout);
    return 0;
}
