//go:build linux

package soakbench

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/engine"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/store/seal"
	"github.com/kiln-sandbox/kiln/internal/store/sqlite"
)

// checkRecords reads the stopped server's store itself: the API does not
// show a resume that was accepted but never done (the record stays
// SUSPENDED with a pending operation), the store does. A record is stuck
// when it is in a transitional state or has an operation pending; lost
// when one of ids is not there at all.
//
// It also returns the image directories (DATA_DIR/images/ACCOUNT/IMAGE/
// VERSION, as the engine names them) of the versions the store holds.
func checkRecords(ctx context.Context, data string, ids []string, res *Result) (map[string]bool, error) {
	sl, err := seal.LoadOrCreate(filepath.Join(data, sqlite.KeyFile))
	if err != nil {
		return nil, err
	}
	st, err := sqlite.Open(ctx, filepath.Join(data, "kiln.db"), sqlite.WithSealer(sl))
	if err != nil {
		return nil, fmt.Errorf("opening the store: %w", err)
	}
	defer st.Close()
	ms, err := st.ListMicrovmsInState(ctx, 1<<20, store.StatePending, store.StateRunning, store.StateSuspending,
		store.StateSuspended, store.StateTerminating, store.StateTerminated)
	if err != nil {
		return nil, fmt.Errorf("listing the records: %w", err)
	}
	found := map[string]bool{}
	for _, m := range ms {
		found[m.ID] = true
		if !stable(string(m.State)) || m.PendingOp != "" {
			res.RecordsStuck++
			res.CycleErrors = append(res.CycleErrors, fmt.Sprintf("stuck: %s %s (pending %q)", m.ID, m.State, m.PendingOp))
		}
	}
	for _, id := range ids {
		if !found[id] {
			res.RecordsLost++
			res.CycleErrors = append(res.CycleErrors, "lost from the store: "+id)
		}
	}
	images := map[string]bool{}
	for page := ""; ; {
		vs, next, err := st.ListAllImageVersions(ctx, store.Page{Token: page, Limit: 1000})
		if err != nil {
			return nil, fmt.Errorf("listing image versions: %w", err)
		}
		for _, v := range vs {
			images[engine.ImageDir(data, v.Account, v.ImageName, v.Version)] = true
		}
		if next == "" {
			return images, nil
		}
		page = next
	}
}
