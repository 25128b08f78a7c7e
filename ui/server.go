//go:build linux

// Package ui serves mpvpn's local dashboard: one page, its assets
// embedded in the binary, that follows a running client or concentrator
// live over server-sent events (per-uplink throughput over the last
// minutes, each uplink's state over time, RTTs, subflows, fallbacks, the
// open flows). It is read-only.
//
// A web server on the loopback is reachable from every page the user's
// browser opens: a foreign site can send it requests (cross-site request
// forgery) and, by DNS rebinding, read its answers as same-origin. So
// every request needs the per-start token (in the URL once, then a
// SameSite=Strict cookie), a TCP listener answers only requests whose
// Host header is its own address or localhost at its port, nothing sends
// CORS headers, and the page may not be framed. Jupyter's notebook server
// took the same measures against the same attacks.
package ui

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/mpvpn/mpvpn/control"
)

//go:embed assets
var assets embed.FS

// cookieName holds the token once a page was opened with it.
const cookieName = "mpvpn_ui_token"

// Config is a dashboard to serve.
type Config struct {
	// Addr is a loopback address and port ("127.0.0.1:9511", port 0
	// picks one), or a unix socket: "unix:PATH", or a PATH beginning
	// with "/".
	Addr string
	// Status is the running mpvpn's status; called once per Interval
	// and for each page load.
	Status func() control.Status
	// Interval between samples (default 1 s); History how many are kept
	// for a page opened later (default 300: five minutes at 1 s).
	Interval time.Duration
	History  int
	// Token, when set, is the token instead of a random one (tests).
	Token  string
	Logger *slog.Logger
}

// Server is a running dashboard.
type Server struct {
	cfg   Config
	ln    net.Listener
	unix  string // the socket's path, when Addr is one
	host  []string
	token string
	srv   *http.Server
	page  *template.Template
	log   *slog.Logger

	hist *history
	done chan struct{}
	err  error
	once sync.Once
}

// Serve binds cfg.Addr and serves the dashboard until ctx is done. It
// returns once bound, so that a taken address is an error at start.
func Serve(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.History <= 0 {
		cfg.History = 300
	}
	if cfg.Status == nil {
		return nil, errors.New("ui: no status to show")
	}
	s := &Server{cfg: cfg, log: cfg.Logger, token: cfg.Token, done: make(chan struct{}), hist: newHistory(cfg.History)}
	if s.token == "" {
		var b [16]byte
		rand.Read(b[:]) // never fails (Go 1.24+)
		s.token = hex.EncodeToString(b[:])
	}
	var err error
	if s.page, err = template.New("index.html").Funcs(funcs).ParseFS(assets, "assets/index.html"); err != nil {
		return nil, fmt.Errorf("ui: %w", err)
	}
	if err := s.listen(ctx); err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.index)
	mux.HandleFunc("GET /events", s.events)
	mux.HandleFunc("GET /status.json", s.statusJSON)
	static, _ := fs.Sub(assets, "assets")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	s.srv = &http.Server{
		Handler:           s.guard(mux),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	s.take()
	go s.run(ctx)
	s.log.Info("dashboard listening", "url", s.URL())
	return s, nil
}

// listen binds Addr: a unix socket (owner-only), or a TCP address that
// must be on the loopback, since the dashboard is for this machine. Its
// errors are about the address, which the caller names (--ui).
func (s *Server) listen(ctx context.Context) error {
	var lc net.ListenConfig
	addr := s.cfg.Addr
	if path, ok := strings.CutPrefix(addr, "unix:"); ok || strings.HasPrefix(addr, "/") {
		if !ok {
			path = addr
		}
		if fi, err := os.Lstat(path); err == nil {
			if fi.Mode()&fs.ModeSocket == 0 {
				return fmt.Errorf("%s exists and is not a socket", path)
			}
			if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
				c.Close()
				return fmt.Errorf("%s is in use by a running process", path)
			}
			os.Remove(path) // a stale socket from an earlier run
		}
		ln, err := lc.Listen(ctx, "unix", path)
		if err != nil {
			return err
		}
		if err := os.Chmod(path, 0o600); err != nil {
			ln.Close()
			return err
		}
		s.ln, s.unix = ln, path
		return nil
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("%q: want a loopback address and port (127.0.0.1:9511) or unix:PATH: %w", addr, err)
	}
	if !ap.Addr().IsLoopback() {
		return fmt.Errorf("%s is not a loopback address: the dashboard is for this machine (reach it from elsewhere through ssh -L)", ap.Addr())
	}
	ln, err := lc.Listen(ctx, "tcp", ap.String())
	if err != nil {
		return err
	}
	s.ln = ln
	bound := netip.MustParseAddrPort(ln.Addr().String())
	s.host = []string{bound.String(), fmt.Sprintf("localhost:%d", bound.Port())}
	return nil
}

// URL is where the dashboard is, with the token: what the log and
// `mpvpn status` print. For a unix socket, the path and the token.
func (s *Server) URL() string {
	if s.unix != "" {
		return "unix:" + s.unix + " /?token=" + s.token
	}
	return "http://" + s.host[0] + "/?token=" + s.token
}

// Addr is the address bound.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Token is this start's token.
func (s *Server) Token() string { return s.token }

func (s *Server) run(ctx context.Context) {
	defer close(s.done)
	served := make(chan error, 1)
	go func() { served <- s.srv.Serve(s.ln) }()
	t := time.NewTicker(s.cfg.Interval)
	defer t.Stop()
	var err error
loop:
	for {
		select {
		case <-t.C:
			s.take()
		case err = <-served:
			break loop
		case <-ctx.Done():
			// Event streams never end on their own: close, not Shutdown.
			s.srv.Close()
			err = <-served
			break loop
		}
	}
	if s.unix != "" {
		os.Remove(s.unix)
	}
	if !errors.Is(err, http.ErrServerClosed) {
		s.err = fmt.Errorf("ui: %w", err)
	}
}

// Close stops the dashboard and waits until it has.
func (s *Server) Close() error {
	s.once.Do(func() { s.srv.Close() })
	<-s.done
	return s.err
}

// guard refuses what is not for the dashboard (see the package doc) and
// sets the headers every answer carries.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		if s.unix == "" && !s.hostAllowed(r.Host) {
			s.log.Debug("dashboard: refused a foreign Host", "host", r.Host, "from", r.RemoteAddr)
			http.Error(w, "foreign Host header: this is mpvpn's dashboard, for "+s.host[0]+" only", http.StatusForbidden)
			return
		}
		tok := r.URL.Query().Get("token")
		fromQuery := tok != ""
		if !fromQuery {
			if c, err := r.Cookie(cookieName); err == nil {
				tok = c.Value
			}
		}
		if subtle.ConstantTimeCompare([]byte(tok), []byte(s.token)) != 1 {
			http.Error(w, "no valid token: open the URL with ?token= that the log or `mpvpn status` shows", http.StatusForbidden)
			return
		}
		if fromQuery {
			http.SetCookie(w, &http.Cookie{Name: cookieName, Value: s.token, Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode})
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) hostAllowed(host string) bool {
	for _, h := range s.host {
		if strings.EqualFold(host, h) {
			return true
		}
	}
	return false
}

// take samples the status into the history.
func (s *Server) take() {
	st := s.snapshot()
	s.hist.add(sampleOf(st), st)
}

// maxFlowsShown bounds the open flows a page lists and an event carries.
const maxFlowsShown = 100

// snapshot is the status as the page shows it now.
func (s *Server) snapshot() control.Status {
	st := s.cfg.Status()
	st.UI = "" // the page needs no token printed on it
	if len(st.OpenFlows) > maxFlowsShown {
		st.OpenFlows = st.OpenFlows[:maxFlowsShown]
	}
	return st
}

func (s *Server) index(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	st := s.snapshot()
	if err := s.page.Execute(w, pageData{Status: st, Now: time.Now(), Interval: s.cfg.Interval}); err != nil {
		s.log.Debug("dashboard: page", "err", err)
	}
}

func (s *Server) statusJSON(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(s.snapshot())
}

// event is what the page gets once a sample: the status, and the
// samples for its graphs (all that are kept in the first event, the
// newest in the others).
type event struct {
	Status  control.Status `json:"status"`
	Samples []sample       `json:"samples"`
}

func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("X-Accel-Buffering", "no")
	ctx := r.Context()
	rc := http.NewResponseController(w)
	send := func(samples []sample, st control.Status) error {
		b, err := json.Marshal(event{Status: st, Samples: samples})
		if err != nil {
			return err
		}
		rc.SetWriteDeadline(time.Now().Add(10 * time.Second)) // a reader that stopped reading
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return err
		}
		fl.Flush()
		return nil
	}
	samples, st, seq := s.hist.since(0)
	if send(samples, st) != nil {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.hist.wait(seq):
			samples, st, seq = s.hist.since(seq)
			if send(samples, st) != nil {
				return
			}
		}
	}
}
