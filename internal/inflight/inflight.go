// Package inflight holds, per account, the bytes of uploads still being
// received. A bound on what an account keeps is checked before an upload
// is read and the upload counts only once it is stored; without a hold,
// uploads that each fit alone would all pass the check together and the
// account would keep their sum.
package inflight

import (
	"errors"
	"os"
	"strings"
	"sync"
)

// Bytes is a ledger of held bytes per account. Its zero value is ready.
type Bytes struct {
	mu       sync.Mutex // guards accounts and each account's held and users
	accounts map[string]*account
}

type account struct {
	turn  sync.Mutex // the account's checks take turns
	held  int64
	users int // checks waiting or running, and holds not released
}

// Hold runs check with the bytes the account's other uploads hold and,
// if check passes, holds n bytes for the account until release is
// called. The checks of one account take turns (another account's do not
// wait for them); release may be called more than once.
func (b *Bytes) Hold(name string, n int64, check func(held int64) error) (release func(), err error) {
	b.mu.Lock()
	if b.accounts == nil {
		b.accounts = map[string]*account{}
	}
	a := b.accounts[name]
	if a == nil {
		a = &account{}
		b.accounts[name] = a
	}
	a.users++
	b.mu.Unlock()

	a.turn.Lock()
	defer a.turn.Unlock()
	b.mu.Lock()
	held := a.held
	b.mu.Unlock()
	if err := check(held); err != nil {
		b.leave(name, a, 0)
		return nil, err
	}
	b.mu.Lock()
	a.held += n
	b.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { b.leave(name, a, n) }) }, nil
}

func (b *Bytes) leave(name string, a *account, n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	a.held -= n
	if a.users--; a.users == 0 {
		delete(b.accounts, name)
	}
}

// Held is what the account's uploads hold now.
func (b *Bytes) Held(name string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	if a := b.accounts[name]; a != nil {
		return a.held
	}
	return 0
}

// TempPrefix starts the name of the file an upload is received into
// before it is renamed into place: while it arrives it counts by what the
// upload holds, not by its size so far.
const TempPrefix = ".upload-"

// StoredBytes adds up the sizes of the regular files directly in dir but
// for uploads still arriving (TempPrefix). A dir that does not exist
// holds nothing.
func StoredBytes(dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, nil
		}
		return 0, err
	}
	var n int64
	for _, e := range ents {
		if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), TempPrefix) {
			continue
		}
		if info, err := e.Info(); err == nil {
			n += info.Size()
		}
	}
	return n, nil
}
