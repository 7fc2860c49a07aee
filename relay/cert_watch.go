package relay

import (
	"context"
	"fmt"
	"time"
)

// CertStatus is the served certificate judged at one moment: for status
// pages, metrics and the expiry warnings.
type CertStatus struct {
	CertInfo
	// Serving is false before there is a certificate (ACME before its
	// first issuance); the other fields are then zero.
	Serving bool
	// Problem is what is wrong with its dates; CertOK when nothing is.
	Problem CertProblem
	// DaysLeft is whole days until NotAfter (negative once expired).
	DaysLeft int
	// Fix is the Server's CertAdvice for Problem; empty when there is no
	// problem or no advice.
	Fix string
}

// Defaults of the expiry watch.
const (
	// certCheckEvery is how often the watch looks at the certificate: a
	// renewal, a reload or crossing WarnFrom is said within this long.
	certCheckEvery = time.Minute
	// certRepeatEvery is how often a problem that persists is said again.
	certRepeatEvery = 24 * time.Hour
)

// certRefresher is implemented by Certificates whose Current can lag
// behind what the next handshake would serve (manual files replaced on
// disk): refresh brings it up to date without waiting for a client.
type certRefresher interface{ refresh() }

// certChangeNotifier is implemented by Certificates that swap certificates
// and can say when, so the swap is judged at once, not at the next check.
type certChangeNotifier interface{ changes() <-chan struct{} }

// CertStatus judges the certificate being served now.
func (s *Server) CertStatus() CertStatus { return s.certStatus(time.Now()) }

func (s *Server) certStatus(now time.Time) CertStatus {
	info, ok := s.Certs.Current()
	if !ok {
		return CertStatus{}
	}
	st := CertStatus{CertInfo: info, Serving: true, Problem: info.Problem(now), DaysLeft: info.DaysLeft(now)}
	if st.Problem != CertOK && s.CertAdvice != nil {
		st.Fix = s.CertAdvice(st.Problem)
	}
	return st
}

// certWatch says when the served certificate is close to its end, past
// it, or not valid yet: when it first sees the problem, when the
// certificate changes, and once a day while the problem lasts. The state
// is owned by the one goroutine running it (and Start before that).
type certWatch struct {
	s          *Server
	seen       bool
	last       CertInfo
	lastProb   CertProblem
	lastLogged time.Time
}

// check judges the certificate at now, logs what is worth saying, and
// reports a changed certificate to OnCertChange.
func (w *certWatch) check(now time.Time) {
	st := w.s.certStatus(now)
	if !st.Serving {
		return
	}
	changed := w.seen && st.CertName != w.last.CertName
	first := !w.seen
	prevProb := w.lastProb
	w.seen, w.last, w.lastProb = true, st.CertInfo, st.Problem
	if changed && w.s.OnCertChange != nil {
		w.s.OnCertChange(st)
	}
	if st.Problem == CertOK {
		if changed && prevProb != CertOK {
			w.s.Logger.Info("relay: the certificate was replaced; its dates are fine now",
				"subject", st.Subject, "not_after", st.NotAfter.UTC().Format(time.RFC3339), "days_left", st.DaysLeft)
		}
		return
	}
	if !first && !changed && st.Problem == prevProb && now.Sub(w.lastLogged) < certRepeatEvery {
		return
	}
	w.lastLogged = now
	w.s.logCertProblem(st)
}

// logCertProblem says what is wrong with the certificate, and the fix.
func (s *Server) logCertProblem(st CertStatus) {
	attrs := []any{"subject", st.Subject, "not_before", st.NotBefore.UTC().Format(time.RFC3339),
		"not_after", st.NotAfter.UTC().Format(time.RFC3339), "days_left", st.DaysLeft}
	if st.File != "" {
		attrs = append(attrs, "file", st.File)
	}
	if st.SelfSigned {
		attrs = append(attrs, "cert_name", st.CertName)
	}
	if st.Fix != "" {
		attrs = append(attrs, "fix", st.Fix)
	}
	switch st.Problem {
	case CertExpiring:
		s.Logger.Warn(fmt.Sprintf("relay: the certificate expires in %d days; after that Tailscale clients refuse it and cannot connect", st.DaysLeft), attrs...)
	case CertExpired:
		s.Logger.Error("relay: the certificate has expired: Tailscale clients refuse it and cannot connect", attrs...)
	case CertNotYetValid:
		s.Logger.Error("relay: the certificate is not valid yet: Tailscale clients refuse it until its not_before (is this machine's clock right?)", attrs...)
	}
}

// watchCerts runs the watch until ctx ends.
func (s *Server) watchCerts(ctx context.Context, w *certWatch) {
	every := s.certCheckEvery
	if every == 0 {
		every = certCheckEvery
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var changes <-chan struct{}
	if n, ok := s.Certs.(certChangeNotifier); ok {
		changes = n.changes()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-changes:
		case <-t.C:
			if r, ok := s.Certs.(certRefresher); ok {
				r.refresh()
			}
		}
		w.check(time.Now())
	}
}

// certProblemGauge is 1 while the certificate has a problem (the relay
// warns about it), for an alert that follows the relay's own judgement.
func (s *Server) certProblemGauge() any {
	if info, ok := s.Certs.Current(); ok && info.Problem(time.Now()) != CertOK {
		return 1
	}
	return 0
}
