// Package inflight holds, per account, the bytes of uploads still being
// received. A bound on what an account keeps is checked before an upload
// is read and the upload counts only once it is stored; without a hold,
// uploads that each fit alone would all pass the check together and the
// account would keep their sum.
package inflight

import "sync"

// Bytes is a ledger of held bytes per account. Its zero value is ready.
type Bytes struct {
	mu   sync.Mutex
	held map[string]int64
}

// Hold runs check with the bytes the account's other uploads hold and,
// if check passes, holds n bytes for the account until release is
// called. Checks of one ledger take turns, so check should be short (a
// query or a directory listing); release may be called more than once.
func (b *Bytes) Hold(account string, n int64, check func(held int64) error) (release func(), err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := check(b.held[account]); err != nil {
		return nil, err
	}
	if b.held == nil {
		b.held = map[string]int64{}
	}
	b.held[account] += n
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			if b.held[account] -= n; b.held[account] == 0 {
				delete(b.held, account)
			}
		})
	}, nil
}

// Held is what the account's uploads hold now.
func (b *Bytes) Held(account string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held[account]
}
