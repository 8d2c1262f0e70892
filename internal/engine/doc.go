// Package engine is the VM-backed implementation of lifecycle.Backend (what the
// API hands accepted work to) and proxy.Backend (what the endpoint proxy
// asks to route and wake microVMs), plus the idle controller that suspends
// microVMs nobody talks to.
//
// One microVM is, on the host: a network namespace (internal/netns) with
// its TAP and veth pair, a DNS forwarder at its gateway when it has
// INTERNET_EGRESS (internal/dnsfwd), and a VM cloned from its image
// version's snapshot template (vmm.Driver). Every step is idempotent and
// keyed by the microVM id, so that Recover can finish or undo what a killed
// `kiln server` left half done, with the store as the source of truth.
//
// Operations on one microVM are serialised by a per-VM lock; Terminate
// first cancels the VM's context so that an in-flight start or resume gives
// up instead of holding the lock for its whole timeout.
package engine
