//go:build linux

package soakbench

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/awscli"
)

const (
	running    = "RUNNING"
	suspended  = "SUSPENDED"
	terminated = "TERMINATED"
)

// stable states: a record in any other state is on its way somewhere.
func stable(s string) bool { return s == running || s == suspended || s == terminated }

// client calls the API of a server that may be down at any moment: a
// request that got no answer is sent again until one comes.
type client struct {
	c       *awscli.Client
	image   string   // the image the cycles run
	reasons sync.Map // microVM id → its last stateReason, for errors
}

func (c *client) reason(id string) string {
	r, _ := c.reasons.Load(id)
	s, _ := r.(string)
	return s
}

func (c *client) call(ctx context.Context, op string, in map[string]any) (map[string]any, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for {
		out, err := awscli.Call(ctx, c.c, awscli.Find(op), in)
		var ae *awscli.APIError
		switch {
		case err == nil:
			return out, nil
		case errors.As(err, &ae) && ae.Status < 500 && ae.Type != "ThrottlingException":
			return nil, err
		case ctx.Err() != nil:
			return nil, fmt.Errorf("%s: no answer: %w", op, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func isType(err error, t string) bool {
	var ae *awscli.APIError
	return errors.As(err, &ae) && ae.Type == t
}

// createImage builds the soak image. A boot of the build VM can time out
// on a loaded TCG host; that is not what the soak tests, so a failed
// build is tried again under another name, up to three times.
func (c *client) createImage(ctx context.Context, base, codeZip string, timeout time.Duration) error {
	var errs []error
	for i := 1; i <= 3; i++ {
		name := fmt.Sprintf("%s-%d", base, i)
		err := c.buildImage(ctx, name, codeZip, timeout)
		if err == nil {
			c.image = name
			return nil
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (c *client) buildImage(ctx context.Context, name, codeZip string, timeout time.Duration) error {
	managed, err := c.call(ctx, "ListManagedMicrovmImages", map[string]any{})
	if err != nil {
		return err
	}
	items, _ := managed["items"].([]any)
	if len(items) == 0 {
		return errors.New("no managed base image listed")
	}
	base, _ := items[0].(map[string]any)["imageArn"].(string)
	_, err = c.call(ctx, "CreateMicrovmImage", map[string]any{
		"name": name, "baseImageArn": base, "clientToken": name,
		"buildRoleArn": "arn:aws:iam::123456789012:role/kiln-soak",
		"codeArtifact": map[string]any{"uri": (&url.URL{Scheme: "file", Path: codeZip}).String()},
	})
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		out, err := c.call(ctx, "GetMicrovmImage", map[string]any{"imageIdentifier": name})
		if err != nil {
			return err
		}
		switch out["state"] {
		case "CREATED":
			return nil
		case "FAILED", "CREATE_FAILED":
			return fmt.Errorf("image build failed: %v", out)
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("image not built within %s", timeout)
}

// waitStable polls the microVM until it is in a stable state.
func (c *client) waitStable(ctx context.Context, id string, timeout time.Duration) (string, error) {
	return c.waitFor(ctx, id, "", 0, timeout)
}

// waitFor polls the microVM until it is in state want, or has stayed in
// another stable state for settle (an operation a kill cut short: the
// caller sends it again; a resume stays SUSPENDED until it is done, so
// only time tells). A transitional state held for timeout is an error.
func (c *client) waitFor(ctx context.Context, id, want string, settle, timeout time.Duration) (string, error) {
	start := time.Now()
	var since time.Time
	last := ""
	for {
		out, err := c.call(ctx, "GetMicrovm", map[string]any{"microvmIdentifier": id})
		if err != nil {
			return "", err // ResourceNotFoundException: the record is lost
		}
		s, _ := out["state"].(string)
		if r, _ := out["stateReason"].(string); r != "" {
			c.reasons.Store(id, r)
		}
		if s != last {
			last, since = s, time.Now()
		}
		switch {
		case s == want:
			return s, nil
		case stable(s) && time.Since(since) >= settle:
			return s, nil
		case !stable(s) && time.Since(since) > timeout:
			return s, fmt.Errorf("stuck in %s for %s", s, timeout)
		case time.Since(start) > timeout+settle:
			return s, fmt.Errorf("not %s after %s (%s)", want, time.Since(start).Round(time.Second), s)
		}
		time.Sleep(150 * time.Millisecond)
	}
}

// cycle runs one microVM through run, suspend, resume and terminate. Each
// step is sent again if a kill made it fall back (a suspend cut short
// leaves the VM RUNNING); the run carries a client token, so a RunMicrovm
// whose answer was lost names the same microVM when sent again.
func (c *client) cycle(ctx context.Context, token string, timeout time.Duration) (string, error) {
	out, err := c.call(ctx, "RunMicrovm", map[string]any{"imageIdentifier": c.image, "clientToken": token,
		"idlePolicy": map[string]any{"maxIdleDurationSeconds": 3600, "suspendedDurationSeconds": 3600, "autoResumeEnabled": false}})
	if err != nil {
		return "", fmt.Errorf("RunMicrovm: %w", err)
	}
	id, _ := out["microvmId"].(string)
	if id == "" {
		return "", fmt.Errorf("RunMicrovm answered no microvmId: %v", out)
	}
	s, err := c.waitFor(ctx, id, running, 0, timeout)
	if err != nil {
		return id, fmt.Errorf("after RunMicrovm: %w", err)
	}
	if s != running {
		return id, fmt.Errorf("after RunMicrovm: %s (%q), want RUNNING", s, c.reason(id))
	}
	for _, step := range []struct{ op, want string }{
		{"SuspendMicrovm", suspended}, {"ResumeMicrovm", running}, {"TerminateMicrovm", terminated},
	} {
		for attempt := 0; s != step.want; attempt++ {
			if s == terminated || attempt == 4 {
				return id, fmt.Errorf("%s: %s (%q), want %s", step.op, s, c.reason(id), step.want)
			}
			_, err := c.call(ctx, step.op, map[string]any{"microvmIdentifier": id})
			if err != nil && !isType(err, "ConflictException") {
				return id, fmt.Errorf("%s: %w", step.op, err)
			}
			if s, err = c.waitFor(ctx, id, step.want, settle, timeout); err != nil {
				return id, fmt.Errorf("after %s: %w", step.op, err)
			}
		}
	}
	return id, nil
}

// settle is how long a microVM may sit in a stable state other than the
// one its operation asked for before the operation is sent again.
const settle = 20 * time.Second

// settleAndCount waits until every record is stable, counts the final
// states, then terminates what failed cycles left alive so that nothing
// of the data directory may remain.
func (c *client) settleAndCount(ctx context.Context, ids []string, res *Result, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var items []any
	for {
		out, err := awscli.CallAll(ctx, c.c, awscli.Find("ListMicrovms"), map[string]any{})
		if err != nil {
			return fmt.Errorf("ListMicrovms: %w", err)
		}
		items, _ = out["items"].([]any)
		settled := true
		for _, it := range items {
			if s, _ := it.(map[string]any)["state"].(string); !stable(s) {
				settled = false
			}
		}
		if settled || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	states := map[string]string{}
	for _, it := range items {
		m, _ := it.(map[string]any)
		id, _ := m["microvmId"].(string)
		s, _ := m["state"].(string)
		states[id] = s
		res.FinalStates[s]++
	}
	for _, id := range ids {
		if _, ok := states[id]; !ok {
			res.CycleErrors = append(res.CycleErrors, "not listed by the API: "+id)
		}
	}
	var alive []string
	for id, s := range states {
		if s == running || s == suspended {
			alive = append(alive, id)
			if _, err := c.call(ctx, "TerminateMicrovm", map[string]any{"microvmIdentifier": id}); err != nil && !isType(err, "ConflictException") {
				return fmt.Errorf("terminating %s: %w", id, err)
			}
		}
	}
	for _, id := range alive {
		if s, err := c.waitStable(ctx, id, timeout); err != nil || s != terminated {
			return fmt.Errorf("terminating %s: %s %v", id, s, err)
		}
	}
	return nil
}
