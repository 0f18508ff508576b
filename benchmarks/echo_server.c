/*
 * echo_server: a trivial single-threaded epoll echo server in C.
 *
 * The benchmark's reference point, not a peer: it shows how many round
 * trips the load generator can drive when the server costs almost nothing,
 * so that a Python server's figure can be told apart from a load-generator
 * limit.  It echoes bytes as they arrive (no line parsing).
 *
 *   echo_server --tcp 127.0.0.1:0
 *   echo_server --udp 127.0.0.1:0
 *
 * Port 0 picks a free port.  Once listening it prints
 * "serving TCP on HOST:PORT" (or UDP), the line trioserve's command line
 * prints, and serves until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 1024
/* One receive buffer shared by every connection: bytes are written back
 * before the next read, except a remainder that did not fit (kept below). */
#define BUFFER_SIZE (256 * 1024)

struct conn {
    int fd;
    int listening; /* the TCP listener, or the UDP socket */
    char *pending; /* bytes the socket would not take yet */
    size_t pending_len, pending_off;
};

static int epfd;
static char buffer[BUFFER_SIZE];

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void parse_address(const char *text, struct sockaddr_in *addr) {
    const char *colon = strrchr(text, ':');
    if (!colon) {
        fprintf(stderr, "%s is not HOST:PORT\n", text);
        exit(2);
    }
    char host[64];
    size_t len = (size_t)(colon - text);
    if (len >= sizeof host) len = sizeof host - 1;
    memcpy(host, text, len);
    host[len] = 0;
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &addr->sin_addr) != 1) {
        fprintf(stderr, "%s is not an IPv4 address\n", host);
        exit(2);
    }
}

static void watch(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void drop(struct conn *c) {
    close(c->fd);
    free(c->pending);
    free(c);
}

/* Write data, keeping what the socket will not take; returns -1 on error. */
static int send_or_keep(struct conn *c, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN) return -1;
            c->pending = malloc(len);
            if (!c->pending) die("malloc");
            memcpy(c->pending, data, len);
            c->pending_len = len;
            c->pending_off = 0;
            /* Stop reading until the backlog is sent: memory stays bounded. */
            watch(c, EPOLLOUT, EPOLL_CTL_MOD);
            return 0;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static void on_tcp(struct conn *c, uint32_t events) {
    if (c->pending) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        char *rest = c->pending + c->pending_off;
        size_t len = c->pending_len - c->pending_off;
        ssize_t n = send(c->fd, rest, len, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN) {
            drop(c);
            return;
        }
        if (n > 0) c->pending_off += (size_t)n;
        if (c->pending_off == c->pending_len) {
            free(c->pending);
            c->pending = NULL;
            watch(c, EPOLLIN, EPOLL_CTL_MOD);
        }
        return;
    }
    ssize_t n = recv(c->fd, buffer, sizeof buffer, 0);
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0 || send_or_keep(c, buffer, (size_t)n) < 0) drop(c);
}

static void on_accept(struct conn *listener) {
    for (;;) {
        int fd = accept4(listener->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) return;
            if (errno == EMFILE || errno == ENFILE) return; /* retried when ready */
            die("accept4");
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        watch(c, EPOLLIN, EPOLL_CTL_ADD);
    }
}

static void on_udp(struct conn *c) {
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        ssize_t n = recvfrom(c->fd, buffer, sizeof buffer, 0, (struct sockaddr *)&peer,
                             &peer_len);
        if (n < 0) return; /* EAGAIN, or an ICMP error from an old peer */
        sendto(c->fd, buffer, (size_t)n, 0, (struct sockaddr *)&peer, peer_len);
    }
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "--tcp") && strcmp(argv[1], "--udp"))) {
        fprintf(stderr, "usage: echo_server --tcp|--udp HOST:PORT\n");
        return 2;
    }
    int udp = !strcmp(argv[1], "--udp");
    struct sockaddr_in addr;
    parse_address(argv[2], &addr);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);

    int fd = socket(AF_INET, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (!udp && listen(fd, SOMAXCONN) < 0) die("listen");
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &addr.sin_addr, host, sizeof host);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    struct conn listener = {.fd = fd, .listening = 1};
    watch(&listener, EPOLLIN, EPOLL_CTL_ADD);
    printf("serving %s on %s:%d\n", udp ? "UDP" : "TCP", host, ntohs(addr.sin_port));
    fflush(stdout);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c->listening) on_tcp(c, events[i].events);
            else if (udp) on_udp(c);
            else on_accept(c);
        }
    }
}
