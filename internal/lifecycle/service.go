package lifecycle

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// SuspendedRetentionSeconds is how long a microVM suspended at its
// deadline (Microvm.OnDeadline) is kept before it is terminated: 8 hours,
// the longest maximum duration, so a suspended microVM's disk and memory
// files are bounded in time like a running one's.
const SuspendedRetentionSeconds = 8 * 3600

// ResumedTimeoutSeconds is how long a microVM suspended at its deadline
// (Microvm.OnDeadline, E2B's autoPause) runs once resumed: E2B's default
// timeout of a resumed sandbox.
const ResumedTimeoutSeconds = 300

// BackendError is a transition the store accepted but the backend did
// not: the API reports it as the server's fault, not the caller's.
type BackendError struct {
	Op  string
	Err error
}

func (e *BackendError) Error() string { return e.Op + ": " + e.Err.Error() }
func (e *BackendError) Unwrap() error { return e.Err }

// Service runs microVM transitions: each is recorded in the store first
// (from the states it is allowed from, in one transaction) and then handed
// to the backend. Errors wrap errdefs: ErrNotFound, ErrConflict (not in a
// state the transition leaves from), ErrExhausted (no room to resume), or
// a *BackendError.
type Service struct {
	st  store.Store
	be  Backend
	rep *Reporter
	now func() time.Time
	// gate, when set, says whether this process runs the deadline
	// controller now (a cluster runs it on one control replica).
	gate func(context.Context) bool
}

// SetGate makes the deadline controller run a round only when gate says
// so; set it before Start.
func (s *Service) SetGate(gate func(context.Context) bool) { s.gate = gate }

// New returns the life cycle over st, handing work to be; now is the
// clock (nil: time.Now).
func New(st store.Store, be Backend, now func() time.Time) *Service {
	if now == nil {
		now = time.Now
	}
	rep := NewReporter(st)
	rep.now = now
	s := &Service{st: st, be: be, rep: rep, now: now}
	if a, ok := be.(Aware); ok {
		a.SetLifecycle(s)
	}
	return s
}

// Aware is optionally implemented by a Backend that starts transitions
// itself (the idle controller's suspend, the endpoint proxy's
// auto-resume): New hands it the Service, so that those transitions keep
// the records and the backend calls as consistent as the APIs' own.
type Aware interface {
	SetLifecycle(*Service)
}

// Reporter returns the Reporter writing to this service's store.
func (s *Service) Reporter() *Reporter { return s.rep }

// Suspend moves a RUNNING microVM to SUSPENDING and asks the backend to
// suspend it; a suspend the backend refuses puts it back to RUNNING.
func (s *Service) Suspend(ctx context.Context, account, id, reason string) error {
	m, err := s.st.UpdateMicrovm(ctx, account, id, []store.MicrovmState{store.StateRunning}, func(m *store.Microvm) error {
		m.SetState(store.StateSuspending, reason, s.now().UTC())
		return nil
	})
	if err != nil {
		return err
	}
	if err := s.be.SuspendMicrovm(ctx, m); err != nil {
		s.rep.MicrovmState(context.WithoutCancel(ctx), account, id, []store.MicrovmState{store.StateSuspending}, store.StateRunning, "SuspendFailed: "+err.Error())
		return &BackendError{Op: "suspending microvm", Err: err}
	}
	return nil
}

// Resume asks the backend to resume a SUSPENDED microVM (it stays
// SUSPENDED, with a pending resume, until the backend reports RUNNING).
// Resuming one already being resumed is accepted again without a second
// backend call.
func (s *Service) Resume(ctx context.Context, account, id string) error {
	already := false
	m, err := s.st.UpdateMicrovm(ctx, account, id, []store.MicrovmState{store.StateSuspended}, func(m *store.Microvm) error {
		already = m.PendingOp == "resume"
		m.PendingOp = "resume"
		now := s.now().UTC()
		m.UpdatedAt = now
		if m.OnDeadline == store.DeadlineSuspend && !already {
			// Its deadline was pushed to the retention when it was
			// suspended; resumed (by traffic, or E2B's connect, which then
			// sets its own), it runs for E2B's resume timeout.
			m.DeadlineAt = now.Add(ResumedTimeoutSeconds * time.Second)
			m.MaximumDurationInSeconds = int64(m.DeadlineAt.Sub(m.StartedAt).Round(time.Second) / time.Second)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if already {
		return nil
	}
	if err := s.be.ResumeMicrovm(ctx, m); err != nil {
		s.st.UpdateMicrovm(context.WithoutCancel(ctx), account, id, nil, func(m *store.Microvm) error {
			m.PendingOp = ""
			return nil
		})
		return &BackendError{Op: "resuming microvm", Err: err}
	}
	return nil
}

// Terminate moves a microVM to TERMINATING and asks the backend to stop
// it. Terminating one already TERMINATING is accepted again; a TERMINATED
// one is ErrConflict.
func (s *Service) Terminate(ctx context.Context, account, id, reason string) error {
	m, err := s.st.UpdateMicrovm(ctx, account, id, []store.MicrovmState{store.StatePending, store.StateRunning, store.StateSuspending, store.StateSuspended, store.StateTerminating}, func(m *store.Microvm) error {
		if m.State != store.StateTerminating {
			m.SetState(store.StateTerminating, reason, s.now().UTC())
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := s.be.TerminateMicrovm(ctx, m); err != nil {
		return &BackendError{Op: "terminating microvm", Err: err}
	}
	return nil
}

// Start hands unfinished work to the backend (see Recover) and then runs
// the deadline controller until ctx ends. It returns after recovery.
func (s *Service) Start(ctx context.Context) {
	if err := Recover(ctx, s.st, s.be); err != nil {
		slog.Error("recovering unfinished work", "err", err)
	}
	go s.reap(ctx)
}

func (s *Service) reap(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if s.gate != nil && !s.gate(ctx) {
			continue
		}
		s.ReapOnce(ctx)
	}
}

// ReapOnce terminates the microVMs whose deadlines have passed, or
// suspends those that asked for it (Microvm.OnDeadline).
func (s *Service) ReapOnce(ctx context.Context) {
	now := s.now()
	due, err := s.st.ListMicrovmsDue(ctx, now, 100)
	if err != nil {
		slog.Error("listing microvms past their deadline", "err", err)
		return
	}
	for _, m := range due {
		if m.OnDeadline == store.DeadlineSuspend && !now.Before(m.DeadlineAt) {
			if !s.suspendAtDeadline(ctx, m) {
				continue
			}
		}
		reason := "MaximumDurationExceeded: the microVM reached maximumDurationInSeconds"
		if m.State == store.StateSuspended && m.SuspendDeadlineAt != nil && !now.Before(*m.SuspendDeadlineAt) && now.Before(m.DeadlineAt) {
			reason = "SuspendedDurationExceeded: the microVM stayed suspended for suspendedDurationSeconds"
		}
		if err := s.Terminate(ctx, m.Account, m.ID, reason); err != nil {
			slog.Warn("terminating microvm past its deadline", "microvm", m.ID, "err", err)
		}
	}
}

// suspendAtDeadline handles a due microVM that asked to be suspended at
// its deadline, and reports whether it must be terminated instead. A
// RUNNING one gets its new deadline (now plus the retention) before the
// suspend, so the next tick does not find it due again; a suspend the
// backend refuses terminates it (a microVM must not outlive its deadline
// running). One in transition (PENDING, SUSPENDING, a resume pending) is
// looked at again on a later tick; a SUSPENDED one past its retention is
// terminated.
func (s *Service) suspendAtDeadline(ctx context.Context, m store.Microvm) (terminate bool) {
	retention := time.Duration(SuspendedRetentionSeconds) * time.Second
	switch {
	case m.State == store.StateRunning:
	case m.State == store.StateSuspended && m.PendingOp == "":
		if m.SuspendedAt != nil && s.now().Before(m.SuspendedAt.Add(retention)) {
			// Suspended by hand before the deadline: the retention counts
			// from the suspension.
			_, err := s.st.UpdateMicrovm(ctx, m.Account, m.ID, []store.MicrovmState{store.StateSuspended}, func(r *store.Microvm) error {
				r.DeadlineAt = r.SuspendedAt.Add(retention)
				return nil
			})
			if err != nil {
				slog.Warn("moving a suspended microvm's deadline", "microvm", m.ID, "err", err)
			}
			return false
		}
		return true
	default:
		return false
	}
	now := s.now().UTC()
	_, err := s.st.UpdateMicrovm(ctx, m.Account, m.ID, []store.MicrovmState{store.StateRunning}, func(r *store.Microvm) error {
		r.DeadlineAt = now.Add(retention)
		r.UpdatedAt = now
		return nil
	})
	if err != nil {
		return false // it moved meanwhile: look again on the next tick
	}
	err = s.Suspend(ctx, m.Account, m.ID, "DeadlineSuspended: the microVM reached its deadline and asked to be suspended")
	var be *BackendError
	switch {
	case err == nil:
		return false
	case !errors.As(err, &be) && errors.Is(err, errdefs.ErrConflict):
		return false // it moved meanwhile (a pause, a terminate): nothing to force
	}
	slog.Warn("suspending microvm at its deadline; terminating it", "microvm", m.ID, "err", err)
	return true
}
